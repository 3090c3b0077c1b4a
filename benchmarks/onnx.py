"""ONNX Runtime on BERT-base: torch's export, torch's export + ORT's transformer optimizer, and
attnopt's export, side by side in one run.

Variants (every one runs in onnxruntime's CPU provider, same inputs, calls interleaved):

- ``torch-export``: ``torch.onnx.export(model, dynamo=True)`` of HF BERT-base (sdpa) at the
  exporter's default opset.
- ``torch-export+ort-optimizer``: that file through
  ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` (fused attention,
  LayerNorm, GELU where it recognises them); the fused op counts are reported.
- ``attnopt-export``: ``attnopt.export_onnx(attnopt.compile(model, passes="exact"))`` (dense
  attention as the opset-23 ``Attention`` op).

Shapes: batch 8 at sequence 128 and 512 (BERT-base: 12 layers, hidden 768, random weights, all
tokens real). Reported: median ms, speed-up against ``torch-export``, max abs difference to
eager PyTorch, attention ops in the file. Writes benchmarks/results/onnx.json. Asserts nothing.

Run: ``.venv/bin/python benchmarks/onnx.py [--repeats 5] [--seqs 128,512]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

# This file is named like the onnx package: keep its directory off the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks.common import bert_base, bert_inputs, write_results  # noqa: E402


def _export_torch(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (),
            kwargs=dict(inputs),
            dynamo=True,
            dynamic_shapes={name: {0: batch, 1: seq} for name in inputs},
        )
    program.save(str(path))


def _optimise(path: Path, out: Path) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    optimised = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=768)
    optimised.save_model_to_file(str(out))
    return {k: v for k, v in optimised.get_fused_operator_statistics().items() if v}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _attention_ops(path: Path) -> list[str]:
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    return sorted(op for op in ops if "Attention" in op or op == "Softmax")


def run_seq(seq: int, repeats: int, workdir: Path) -> list[dict[str, Any]]:
    import attnopt

    model = bert_base("sdpa")
    inputs = bert_inputs(8, seq)
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state.numpy()
    files: dict[str, Path] = {}
    setup: dict[str, float] = {}
    fused: dict[str, Any] = {}
    start = time.perf_counter()
    files["torch-export"] = workdir / f"torch-{seq}.onnx"
    _export_torch(model, inputs, files["torch-export"])
    setup["torch-export"] = time.perf_counter() - start
    start = time.perf_counter()
    files["torch-export+ort-optimizer"] = workdir / f"torch-opt-{seq}.onnx"
    fused["torch-export+ort-optimizer"] = _optimise(
        files["torch-export"], files["torch-export+ort-optimizer"]
    )
    setup["torch-export+ort-optimizer"] = time.perf_counter() - start + setup["torch-export"]
    start = time.perf_counter()
    compiled = attnopt.compile(model, (), inputs, passes="exact")
    files["attnopt-export"] = attnopt.export_onnx(compiled, workdir / f"attnopt-{seq}.onnx")
    setup["attnopt-export"] = time.perf_counter() - start
    sessions = {name: _session(path) for name, path in files.items()}
    feeds = {}
    for name, session in sessions.items():
        names = [i.name for i in session.get_inputs()]
        feeds[name] = {n: inputs[n].numpy() for n in names if n in inputs}
        if len(feeds[name]) != len(names):  # attnopt names inputs after the graph's values
            feeds[name] = {n: v.numpy() for n, v in zip(names, inputs.values())}
    outputs = {name: s.run(None, feeds[name])[0] for name, s in sessions.items()}  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            begin = time.perf_counter()
            session.run(None, feeds[name])
            samples[name].append(time.perf_counter() - begin)
    base = statistics.median(samples["torch-export"])
    rows = []
    for name in sessions:
        ms = statistics.median(samples[name]) * 1000
        rows.append(
            {
                "seq": seq,
                "batch": 8,
                "variant": name,
                "ms": round(ms, 1),
                "vs_torch_export": round(base * 1000 / ms, 3),
                "max_abs_vs_eager": float(np.abs(outputs[name] - reference).max()),
                "attention_ops": _attention_ops(files[name]),
                "fused": fused.get(name, {}),
                "setup_s": round(setup[name], 1),
            }
        )
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seqs", default="128,512")
    ns = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq in (int(s) for s in ns.seqs.split(",")):
            rows += run_seq(seq, ns.repeats, Path(tmp))
    table = Table(title="BERT-base in onnxruntime (CPU), batch 8")
    for column in ("seq", "variant", "ms (median)", "vs torch-export", "max |diff| eager", "ops"):
        table.add_column(column, justify="left" if column in ("variant", "ops") else "right")
    for row in rows:
        table.add_row(
            str(row["seq"]),
            row["variant"],
            f"{row['ms']:.1f}",
            f"{row['vs_torch_export']:.2f}x",
            f"{row['max_abs_vs_eager']:.1e}",
            ", ".join(row["attention_ops"]) + (f" {row['fused']}" if row["fused"] else ""),
        )
    Console(width=160).print(table)
    write_results("onnx.json", rows)


if __name__ == "__main__":
    main()
