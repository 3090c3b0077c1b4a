"""Shared pieces of the CPU sparse-attention kernels: flash calls, masks, workspaces.

Entry points: :func:`flash_attend`, :func:`chunked_flash`, :func:`merge_partials`,
:func:`additive_mask`, :func:`gather_pairs`, :func:`bookkeeping_threads`, :func:`workspace`,
:func:`record_computed`, :func:`all_finite` and :func:`exact_visible` (inputs holding NaN/inf).

Every sparse kernel (:mod:`attnopt.runtime.cpu.sliding_window`, :mod:`attnopt.runtime.cpu.block_sparse`,
:mod:`attnopt.runtime.cpu.neighborhood`) reduces to calls of :func:`flash_attend` on gathered or
strided key chunks. PyTorch's CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``)
also returns each row's log-sum-exp, which lets two partial results over disjoint key sets be
merged exactly (:func:`merge_partials`). Masks handed to it are additive, in the query dtype, 2-D
or 4-D with every dim 1 or full: the only layouts the fused kernel takes (through
``F.scaled_dot_product_attention`` anything else silently falls back to the slow math path).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from attnopt.ir.attention_reference import attention_reference, mask_to_4d

__all__ = [
    "additive_mask",
    "all_finite",
    "bookkeeping_threads",
    "check_qkv",
    "chunked_flash",
    "clear_workspace",
    "exact_visible",
    "flash_attend",
    "gather_pairs",
    "mask_empty_rows",
    "merge_partials",
    "record_computed",
    "workspace",
]

#: Below this many elements an elementwise op runs faster on one thread (see bookkeeping_threads).
SMALL_TENSOR = 1 << 20

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def bookkeeping_threads() -> Iterator[None]:
    """Run the small metadata ops of a kernel (routing, block lists, flags) on one thread.

    Ops on tensors of ~10^4-10^5 elements still fork to every OpenMP thread; on a loaded 2-core
    machine each fork waits for a descheduled worker (milliseconds per op, measured: routing at
    N=4096 took 500 ms on 2 threads and 17 ms on one). The heavy gathers and flash calls stay
    outside these sections. The thread count is process-global, so it is only lowered while this
    is the process's one Python thread: with other threads alive (a server, a data loader), the
    section runs on the threads it has, and nothing another thread could observe changes.

    Yields:
        Nothing; the previous thread count is restored on exit.
    """
    threads = torch.get_num_threads()
    if threads == 1 or threading.active_count() > 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_WORKSPACES = threading.local()


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch buffer that lives across calls (one per thread, name, dtype and device).

    Gathering key blocks into freshly allocated memory costs more in page faults than the copy
    itself (measured: 308 ms fresh vs 36 ms into a touched buffer for 327 MB), so the kernels
    keep their bounded workspaces. :func:`clear_workspace` frees them.

    Args:
        name: which buffer (callers use distinct names for buffers alive at the same time).
        numel: elements needed.
        dtype: element type.
        device: device.

    Returns:
        A contiguous 1-D view of ``numel`` elements; its contents are undefined.
    """
    buffers = _WORKSPACES.__dict__.setdefault("buffers", {})
    key = (name, dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buffer
    return buffer[:numel]


def clear_workspace() -> None:
    """Free this thread's scratch buffers (see :func:`workspace`)."""
    _WORKSPACES.__dict__.pop("buffers", None)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate ``[B, H, S, D]`` q, k, v of one `attention` op.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.

    Returns:
        The GQA group size ``Hq // Hkv``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, S, D]")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    return q.shape[1] // k.shape[1]


def gather_pairs(
    t4: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    batch_idx: torch.Tensor | None = None,
    head_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read a broadcast ``[Bm, Hm, Qm, Km]`` mask or bias at chosen (query, key) positions.

    Dims of size 1 are broadcast instead of indexed, so a key-padding mask ``[B, 1, 1, Sk]`` costs
    only one value per key. Only the requested pairs are read: memory is linear in the positions.

    Args:
        t4: 4-D mask or bias.
        q_pos: int64 query positions, broadcastable against ``k_pos``.
        k_pos: int64 key positions.
        batch_idx: with ``head_idx``, per-row batch indices broadcastable against the positions
            (row-wise layout); None keeps the batch and head dims in front.
        head_idx: per-row (query) head indices.

    Returns:
        ``t4[:, :, q_pos, k_pos]`` (``[Bm, Hm, *P]``) or ``t4[batch_idx, head_idx, q_pos, k_pos]``.
    """

    def pick(index: torch.Tensor, size: int) -> torch.Tensor:
        # a broadcast dim reads entry 0 through an all-ones index, which keeps the result's rank
        if size > 1:
            return index
        return torch.zeros((1,) * index.dim(), dtype=torch.long, device=t4.device)

    qi, ki = pick(q_pos, t4.shape[2]), pick(k_pos, t4.shape[3])
    if batch_idx is None:
        return t4[:, :, qi, ki]
    return t4[pick(batch_idx, t4.shape[0]), pick(head_idx, t4.shape[1]), qi, ki]


def additive_mask(
    allowed: torch.Tensor | None,
    user_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Combine structural visibility, a gathered user mask and a gathered bias into one addend.

    Args:
        allowed: bool, True = visible (or None).
        user_mask: gathered user mask, bool or additive float (or None).
        bias: gathered additive bias (or None).
        dtype: dtype of the result (the query dtype, as the flash kernel requires).

    Returns:
        Broadcast additive float tensor (0 / -inf plus bias), or None when nothing is masked.
    """
    parts = [t for t in (allowed, user_mask, bias) if t is not None]
    if not parts:
        return None
    small = math.prod(torch.broadcast_shapes(*[t.shape for t in parts])) < SMALL_TENSOR
    with bookkeeping_threads() if small else contextlib.nullcontext():
        addend: torch.Tensor | None = None
        if bias is not None:
            addend = bias.to(torch.float32)
        if user_mask is not None:
            if user_mask.dtype == torch.bool:
                allowed = user_mask if allowed is None else allowed & user_mask
            else:
                addend = user_mask.to(torch.float32) if addend is None else addend + user_mask
        if allowed is not None:
            if addend is None:  # one pass straight into the target dtype
                zero = torch.zeros((), dtype=dtype, device=allowed.device)
                return torch.where(allowed, zero, float("-inf"))
            addend = addend.masked_fill(~allowed, float("-inf"))
        return addend.to(dtype)


def flash_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    addend: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax attention on 4-D chunks, returning the output and each row's log-sum-exp.

    Args:
        q: ``[N1, N2, Lq, D]`` (any strides with a contiguous last dim).
        k: ``[N1, N2, Lk, D]``.
        v: ``[N1, N2, Lk, Dv]``.
        addend: additive float mask in q's dtype, 2-D ``[Lq, Lk]`` or 4-D with each dim 1 or full.
        scale: score scale.

    Returns:
        ``(out [N1, N2, Lq, Dv] in q's dtype, lse [N1, N2, Lq])``, lse in float32 (float64 for
        float64 inputs). Rows whose every key is masked give zeros; their ``lse`` is unspecified
        (callers overwrite it with ``-inf`` through :func:`mask_empty_rows`).
    """
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if head_dim != value_dim:  # the fused kernel wants one head size; zero columns change nothing
        width = max(head_dim, value_dim)
        q = F.pad(q, (0, width - head_dim))
        k = F.pad(k, (0, width - head_dim))
        v = F.pad(v, (0, width - value_dim))
    if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES:
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=addend, scale=scale)
    else:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
        if addend is not None:
            scores = scores + addend.to(compute)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
        out = torch.matmul(probs, v.to(compute)).to(q.dtype)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out[..., :value_dim], lse.to(lse_dtype)


def mask_empty_rows(lse: torch.Tensor, addend: torch.Tensor | None) -> torch.Tensor:
    """Set the log-sum-exp of rows whose every key is masked to ``-inf``.

    Args:
        lse: ``[..., Lq]`` from :func:`flash_attend`.
        addend: the additive mask used for it (broadcastable to ``[..., Lq, Lk]``), or None.

    Returns:
        ``lse`` with empty rows at ``-inf``.
    """
    if addend is None:
        return lse
    small = addend.numel() < SMALL_TENSOR
    with bookkeeping_threads() if small else contextlib.nullcontext():
        seen = (addend > float("-inf")).any(dim=-1)
    if bool(seen.all()):
        return lse
    with bookkeeping_threads():
        return lse.masked_fill(~seen, float("-inf"))


def chunked_flash(
    q_chunks: torch.Tensor,
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    allowed: torch.Tensor | None,
    user: Sequence[torch.Tensor | None],
    scale: float,
    *,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of many query chunks, each on its own key chunk, in one or a few flash calls.

    Args:
        q_chunks: ``[B * H, nC, C, D]``.
        k_chunks: ``[B * H, nC, L, D]`` (strided views welcome).
        v_chunks: ``[B * H, nC, L, Dv]``.
        allowed: structural visibility shared by batch and heads, bool ``[C, L]`` or
            ``[nC, C, L]`` (or None).
        user: gathered user mask and bias, each ``[Bm, Hm, nC, C or 1, L]`` or None.
        scale: score scale.
        batch: ``B`` (masks that differ per batch element or head run one batch element per call).

    Returns:
        ``(out [B * H, nC, C, Dv], lse [B * H, nC, C])`` with ``-inf`` lse on rows with no key.
    """
    heads = q_chunks.shape[0] // batch
    dtype = q_chunks.dtype
    if all(t is None or t.shape[:2] == (1, 1) for t in user):
        addend = additive_mask(allowed, *[None if t is None else t[0, 0] for t in user], dtype)
        mask = addend if addend is None or addend.dim() == 2 else mask_to_4d(addend, "mask")
        out, lse = flash_attend(q_chunks, k_chunks, v_chunks, mask, scale)
        return out, mask_empty_rows(lse, addend)
    outs, lses = [], []
    for b in range(batch):
        rows = slice(b * heads, (b + 1) * heads)
        sub = [None if t is None else t[b if t.shape[0] > 1 else 0] for t in user]
        addend = additive_mask(allowed, *sub, dtype)
        out, lse = flash_attend(q_chunks[rows], k_chunks[rows], v_chunks[rows], addend, scale)
        outs.append(out)
        lses.append(mask_empty_rows(lse, addend))
    return torch.cat(outs), torch.cat(lses)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Exactly combine two softmax attentions over disjoint key sets.

    Args:
        out_a: ``[..., Lq, Dv]`` normalised output over key set A.
        lse_a: ``[..., Lq]`` log-sum-exp over A (``-inf`` for rows that saw no key).
        out_b: output over key set B.
        lse_b: log-sum-exp over B.

    Returns:
        The output over ``A | B``, in ``out_a``'s dtype; zeros where neither saw a key.
    """
    with bookkeeping_threads():  # per-row scalars; only the lerp below touches every element
        top = torch.maximum(lse_a, lse_b)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
        total = (weight_a + weight_b).clamp_min(torch.finfo(top.dtype).tiny)
        share_b = (weight_b / total).unsqueeze(-1)
    if out_a.dtype in (torch.float32, torch.float64):  # one fused pass: a + share_b * (b - a)
        return torch.lerp(out_a, out_b, share_b.to(out_a.dtype))
    return torch.lerp(out_a.float(), out_b.float(), share_b).to(out_a.dtype)


def record_computed(stats: dict | None, computed_pairs: float, total_pairs: float) -> None:
    """Fill ``stats['computed_fraction']`` (score entries actually computed / all entries).

    Args:
        stats: the caller's dict, or None (nothing recorded).
        computed_pairs: (query, key) score entries the kernel computed, over all batch and heads.
        total_pairs: entries dense attention would compute.
    """
    if stats is None:
        return
    stats["computed_pairs"] = int(computed_pairs)
    stats["computed_fraction"] = float(computed_pairs) / max(float(total_pairs), 1.0)


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite: one reduction per tensor (a sum is also non-finite when
    finite values overflow, which then only takes the slower exact path)."""
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def exact_visible(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """The exact reference with a sparse variant's visibility, over query chunks.

    For inputs holding NaN or inf: the flash calls add -inf for hidden keys, so a NaN/inf key
    would poison rows that never see it, where eager (and the reference) replace a hidden score.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        visible: bool, ``Sq`` rows at dim -2, broadcastable to ``[B, Hq, Sq, Sk]``.
        scale: score scale.
        causal: bottom-right aligned causal rule (of the whole sequence).
        mask: bool or additive mask broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive bias broadcastable to ``[B, Hq, Sq, Sk]``.
        chunk: queries per reference call.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    outs = []
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        mask_rows, bias_rows = (
            t if t is None or t.dim() < 2 or t.shape[-2] == 1 else t[..., start:stop, :]
            for t in (mask, bias)
        )
        rows = visible[..., start:stop, :]
        if causal:
            aligned = torch.arange(start, stop, device=q.device).unsqueeze(1) + (kv_len - q_len)
            rows = rows & (torch.arange(kv_len, device=q.device).unsqueeze(0) <= aligned)
        outs.append(
            attention_reference(
                q[:, :, start:stop],
                k,
                v,
                mask=mask_rows,
                bias=bias_rows,
                scale=scale,
                visible=rows,
            )  # fmt: skip
        )
    return torch.cat(outs, dim=2)
