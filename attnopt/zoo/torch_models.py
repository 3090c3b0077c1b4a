"""Zoo models in plain torch: ``nn.MultiheadAttention`` and ``nn.TransformerEncoder``.

Entry points: :data:`TORCH_ENTRIES`, :class:`MHABlock`, :data:`D_TORCH` (their model width).
"""

from __future__ import annotations

import torch
from torch import nn

from attnopt.zoo.common import Args, ZooEntry, check_impl, generator, seeded

# --------------------------------------------------------------------------------------------
# plain torch: nn.MultiheadAttention, nn.TransformerEncoder

D_TORCH = 32


class MHABlock(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` self-attention (``need_weights=False``) + a
    linear."""

    def __init__(self, dim: int = D_TORCH, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over ``x`` (``[B, S, dim]``), then the linear."""
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.proj(out)


def _build_mha(attn_implementation: str | None) -> nn.Module:
    check_impl(attn_implementation)
    return seeded(MHABlock)


def _build_encoder_layer(attn_implementation: str | None) -> nn.Module:
    check_impl(attn_implementation)

    def make() -> nn.Module:
        layer = nn.TransformerEncoderLayer(
            d_model=D_TORCH, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    return seeded(make)


def _example_hidden(batch: int, seq: int) -> Args:
    return (torch.randn(batch, seq, D_TORCH, generator=generator(batch, seq)),), {}


#: The plain-torch entries, in the zoo's order.
TORCH_ENTRIES = [
    ZooEntry(
        name="mha",
        build=_build_mha,
        example=_example_hidden,
        self_sites=1,
        cross_sites=0,
        hf=False,
        causal=False,
        notes="nn.MultiheadAttention(32, 4, batch_first=True), need_weights=False, + Linear; "
        "input x [B, S, 32], no mask. Eagerly under no_grad/inference_mode the fused fast "
        "path torch._native_multi_head_attention runs; under torch.export it is blocked and "
        "the graph has aten.scaled_dot_product_attention (outputs differ by ~1e-7).",
    ),
    ZooEntry(
        name="encoder_layer",
        build=_build_encoder_layer,
        example=_example_hidden,
        self_sites=2,
        cross_sites=0,
        hf=False,
        causal=False,
        notes="nn.TransformerEncoder of 2 nn.TransformerEncoderLayer(32, 4 heads, ff 64, "
        "batch_first, dropout 0), enable_nested_tensor=False; input src [B, S, 32], no mask. "
        "Eagerly under no_grad the fused torch._transformer_encoder_layer_fwd runs; under "
        "torch.export the decomposed path (aten.scaled_dot_product_attention) is traced "
        "(outputs differ by ~5e-7). Nested tensors are off: with them and a padding mask, "
        "eager zeroes padded rows but the exported graph does not.",
    ),
]
