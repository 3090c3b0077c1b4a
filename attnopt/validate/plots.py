"""PNG plots for numerics reports (matplotlib, optional).

Entry points: :func:`plot_error_per_layer`, :func:`plot_attention_map`, :func:`have_matplotlib`.
Figures are built with ``matplotlib.figure.Figure`` directly, never through pyplot, so plotting
neither needs a display nor changes the caller's global matplotlib backend or state.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import torch


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported.

    Returns:
        True when it is installed.
    """
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float, nrows: int, ncols: int):
    if not have_matplotlib():
        raise ImportError("plots need matplotlib: pip install matplotlib")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _display_sqnr(values: Sequence[float]) -> tuple[list[float], float]:
    """Replace inf (identical) by a ceiling above the finite values so it can be drawn."""
    finite = [value for value in values if math.isfinite(value)]
    ceiling = (max(finite) + 10.0) if finite else 150.0
    shown = [ceiling if value == math.inf else value for value in values]
    return [math.nan if value == -math.inf else value for value in shown], ceiling


def plot_error_per_layer(
    indices: Sequence[int],
    sqnr_db: Sequence[float],
    rel_l2: Sequence[float],
    path: str | Path,
    *,
    failing: Sequence[bool] | None = None,
    title: str = "error per attention site",
) -> Path:
    """Plot SQNR (dB, higher is better) and relative L2 error (log scale) per site index.

    Identical sites (SQNR inf) are drawn at a ceiling with a triangle marker; failing sites
    are drawn in red.

    Args:
        indices: site indices, in layer order.
        sqnr_db: SQNR of each site's output.
        rel_l2: relative L2 error of each site's output.
        path: the PNG file to write.
        failing: per site, whether it failed its tolerance.
        title: the figure title.

    Returns:
        The path written.
    """
    fig, axes = _figure(8.0, 5.5, 2, 1)
    sqnr_ax, rel_ax = axes[0][0], axes[1][0]
    failing = list(failing) if failing is not None else [False] * len(indices)
    shown, ceiling = _display_sqnr(list(sqnr_db))
    sqnr_ax.plot(indices, shown, color="tab:blue", marker="o", linewidth=1)
    identical = [i for i, value in zip(indices, sqnr_db) if value == math.inf]
    if identical:
        sqnr_ax.scatter(
            identical,
            [ceiling] * len(identical),
            marker="^",
            color="tab:green",
            zorder=3,
            label="identical (inf)",
        )
        sqnr_ax.legend(loc="best")
    sqnr_ax.set_ylabel("SQNR (dB)")
    # A log axis cannot show zeros: draw exact matches at a floor far below any real error.
    floor = 1e-18
    rel_shown = [max(value, floor) if math.isfinite(value) else math.nan for value in rel_l2]
    rel_ax.plot(indices, rel_shown, color="tab:orange", marker="o", linewidth=1)
    rel_ax.set_yscale("log")
    rel_ax.set_ylabel("relative L2 error")
    rel_ax.set_xlabel("site index")
    bad = [i for i, failed in zip(range(len(indices)), failing) if failed]
    if bad:
        sqnr_ax.scatter([indices[i] for i in bad], [shown[i] for i in bad], color="red", zorder=4)
        rel_ax.scatter(
            [indices[i] for i in bad],
            [rel_shown[i] for i in bad],
            color="red",
            zorder=4,
            label="failing",
        )
        rel_ax.legend(loc="best")
    for ax in (sqnr_ax, rel_ax):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _as_map(attention: torch.Tensor) -> torch.Tensor:
    """Reduce ``[..., q_len, kv_len]`` to ``[q_len, kv_len]`` by averaging leading dims."""
    attention = attention.detach().to(device="cpu", dtype=torch.float32)
    if attention.ndim < 2:
        raise ValueError(f"attention map needs [..., q_len, kv_len], got {tuple(attention.shape)}")
    return attention.reshape(-1, *attention.shape[-2:]).mean(dim=0)


def plot_attention_map(
    before: torch.Tensor,
    after: torch.Tensor,
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Draw one site's attention map before and after a rewrite, side by side.

    Both heatmaps share one colour scale, so a sparsified map shows its dropped entries as
    the low end of the scale. Leading dimensions (batch, heads) are averaged.

    Args:
        before: attention probabilities ``[..., q_len, kv_len]`` of the reference.
        after: attention probabilities of the rewritten site (same trailing two dims).
        path: the PNG file to write.
        title: the figure title (e.g. the site name).

    Returns:
        The path written.

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: when a map is not at least 2-D or the maps' shapes differ.
    """
    before_map, after_map = _as_map(before), _as_map(after)
    if before_map.shape != after_map.shape:
        raise ValueError(
            f"attention maps differ in shape: before {tuple(before_map.shape)} vs after "
            f"{tuple(after_map.shape)}"
        )
    both = torch.cat([before_map.flatten(), after_map.flatten()])
    both = both[torch.isfinite(both)]
    low, high = (float(both.min()), float(both.max())) if both.numel() else (0.0, 1.0)
    fig, axes = _figure(10.0, 4.5, 1, 2)
    image = None
    for ax, attention, label in zip(axes[0], (before_map, after_map), ("before", "after")):
        image = ax.imshow(
            attention.numpy(),
            vmin=low,
            vmax=high,
            cmap="viridis",
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(label)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.9)
    max_diff = float((after_map - before_map).abs().nan_to_num(nan=math.inf, posinf=math.inf).max())
    fig.suptitle(f"{title or 'attention map'}  (max |after - before| = {max_diff:.3g})")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
