"""The attnopt command line."""

from __future__ import annotations

import json

import pytest

from attnopt.cli import main


def test_inspect_prints_sites_and_explanations(capsys):
    assert main(["inspect", "bert", "--explain", "--cost", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "attention sites" in out and "near-misses" in out and "estimate" in out


def test_inspect_ir_prints_parsable_text(capsys):
    from attnopt.ir import parse

    assert main(["inspect", "mha", "--ir", "--top", "3"]) == 0
    out = capsys.readouterr().out
    text = out[out.index("graph(") : out.index("\n}") + 2]
    assert parse(text).find("attention")


def test_compile_writes_artifacts(tmp_path, capsys):
    assert main(["compile", "gpt2", "--seq", "8", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "graph.ir").read_text().startswith("graph(")
    assert "def make_program" in (tmp_path / "program.py").read_text()
    assert len(json.loads((tmp_path / "sites.json").read_text())) == 2
    assert list((tmp_path / "kernels").glob("_attn_fwd_*.py"))


def test_validate_writes_report(tmp_path, capsys):
    code = main(
        [
            "validate",
            "bert",
            "--seq",
            "16",
            "--passes",
            "canonicalize,fuse-attention,sliding-window{window=4}",
            "--cosine",
            "0.5",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True
    assert list(tmp_path.glob("*.png"))


def test_bad_model_and_pipeline_give_clear_errors(capsys):
    assert main(["inspect", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["inspect", "bert", "--passes", "sliding-window{window=-1}"]) == 2
    assert "window=-1" in capsys.readouterr().err


def test_factory_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.MultiheadAttention(16, 2, batch_first=True)\n"
        "    class W(torch.nn.Module):\n"
        "        def __init__(s): super().__init__(); s.m = m\n"
        "        def forward(s, x): return s.m(x, x, x, need_weights=False)[0]\n"
        "    return W().eval(), (torch.randn(2, 5, 16),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "my_models:build"]) == 0
    assert "attention sites" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"]])
def test_help(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0


def test_plan_out_then_plan_reapplies_the_decisions(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    passes = "canonicalize,fuse-attention,token-merge{ratio=0.5}"
    common = ["bert", "--impl", "sdpa", "--seq", "12", "--passes", passes]
    assert main(["compile", *common, "--out", str(tmp_path / "a"), "--plan-out", str(plan)]) == 0
    saved = json.loads(plan.read_text())
    assert saved["pipeline"] == passes and saved["decisions"]
    assert main(["compile", *common, "--out", str(tmp_path / "b"), "--plan", str(plan)]) == 0
    sites = json.loads((tmp_path / "b" / "sites.json").read_text())
    assert sites[-1]["tokens_kept"] < 1.0
    with pytest.raises(SystemExit):
        main(["compile", *common, "--precision", "fp8"])


def test_compile_with_a_budget_searches_and_saves_plan_and_report(tmp_path, capsys):
    from attnopt import zoo

    _, kwargs = zoo.get("bert").example(2, 12)
    batches = [{name: value.tolist() for name, value in kwargs.items()}] * 2
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(batches))
    plan = tmp_path / "plan.json"
    argv = ["compile", "bert", "--impl", "sdpa", "--seq", "12", "--budget", "cosine=0.99"]
    argv += ["--calibration", str(calibration), "--max-seconds", "60", "--plan-out", str(plan)]
    argv += ["--search-out", str(tmp_path / "search"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "search" / "search.json").read_text())
    assert report["budget"] == "cosine>=0.99" and report["points"][0]["label"] == "exact"
    assert json.loads(plan.read_text())["pipeline"] == report["chosen"]["pipeline"]
    assert (tmp_path / "search" / "search.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="needs --calibration"):
        main(["compile", "bert", "--budget", "cosine=0.99"])
    with pytest.raises(SystemExit, match="field=value"):
        main(["compile", "bert", "--budget", "cosinus=0.99", "--calibration", str(calibration)])


def test_text_calibration_is_tokenized_into_length_sorted_padded_batches(tmp_path):
    from attnopt.cli import load_batches

    texts = tmp_path / "texts.txt"
    texts.write_text("a much longer sentence than the other ones here\nshort\n\nmid sized text\n")
    batches = load_batches(str(texts), "minilm", 2, 16)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (1, 16)]
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths) and len(lengths) == 3
    with pytest.raises(SystemExit, match="tokenizer"):
        load_batches(str(texts), "bert", 2, 16)
