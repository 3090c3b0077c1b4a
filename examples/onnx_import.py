"""ONNX in: optimise the attention of an ONNX file onnxruntime's transformer optimizer leaves alone.

Run: ``.venv/bin/python examples/onnx_import.py``

A small ViT (random weights) is exported with torch's TorchScript-based exporter and passed through
onnxruntime's transformer optimizer, which fuses its layer norms and GELUs but not its attention.
attnopt imports the optimised file, finds both attention sites, compiles them, and runs the model
in torch; its outputs match onnxruntime's on the same file.
"""

import tempfile
import warnings
from pathlib import Path

import torch

import attnopt
from attnopt import zoo
from attnopt.frontend.onnx_import import OnnxModule


def export_vit(path: Path) -> dict[str, torch.Tensor]:
    """Export the zoo's tiny ViT to ``path`` (batch as a dynamic axis); returns example inputs."""
    entry = zoo.get("vit")
    model = entry.build("eager").eval()
    _, inputs = entry.example(2, 0)

    class FirstOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values, return_dict=False)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FirstOutput(), (inputs["pixel_values"],), str(path), dynamo=False, opset_version=17,
            input_names=["pixel_values"], dynamic_axes={"pixel_values": {0: "batch"}},
        )  # fmt: skip
    return inputs


def main() -> dict[str, float]:
    """Export, optimise with onnxruntime, compile with attnopt, compare; returns the figures."""
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        exported, optimised = Path(tmp) / "vit.onnx", Path(tmp) / "vit_ort.onnx"
        inputs = export_vit(exported)
        ort_model = optimize_model(
            str(exported), model_type="vit", num_heads=4, hidden_size=32, opt_level=0
        )
        ort_model.save_model_to_file(str(optimised))
        cm = attnopt.compile(optimised, kwargs=inputs, passes="exact")
        reference = OnnxModule(optimised)  # runs the file in onnxruntime
        difference = (cm(**inputs) - reference(**inputs)).abs().max().item()
    for site in cm.sites:
        print(f"site {site.index}: {site.module} heads={site.num_heads} q_len={site.q_len}")
    print(f"{len(cm.sites)} attention sites; max |attnopt - onnxruntime| = {difference:.2e}")
    return {"sites": len(cm.sites), "max_abs_diff": difference}


if __name__ == "__main__":
    main()
