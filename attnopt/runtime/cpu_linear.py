"""Linear and hybrid (local softmax + linear) attention kernels in torch, for CPU (issue 6).

Entry points: :func:`make_feature_map` (and the :class:`FeatureMap` family), :func:`linear_attention`,
:func:`linear_attention_naive`, :func:`hybrid_attention`, :func:`hybrid_attention_naive`.

Linear attention replaces ``exp(s_ij)`` by a kernel ``k(q_i, k_j) = phi(q_i) . phi(k_j)``:
``out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / phi(q_i) (sum_j phi(k_j))``. Every feature map returns
its features plus an optional log-scale so that ``k(q_i, k_j) = exp(lq_i + lk) phi(q_i) . phi(k_j)``
(FAVOR+ keeps its features in [0, 1] by max subtraction and reports the subtracted maxima there).
The key log-scale ``lk`` is one number per (batch, kv head), so it cancels in linear attention and
only matters when the linear part is added to an exact softmax part (hybrid attention).

Key padding masks (bool, True = keep, or additive float) become per-key log weights ``lw_j``
(``0``/``-inf`` for bool): the softmax part adds them to the scores and the linear part multiplies
``phi(k_j)`` by ``exp(lw_j)``, so a masked key contributes nothing to either.

Positions follow the op's bottom-right alignment: query ``i`` sits at ``i + Sk - Sq``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from attnopt.runtime.reference import causal_mask, visible_keys_mask

__all__ = [
    "CosformerFeatureMap",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "Features",
    "ReluFeatureMap",
    "hybrid_attention",
    "hybrid_attention_naive",
    "linear_attention",
    "linear_attention_naive",
    "make_feature_map",
]


class Features(NamedTuple):
    """Feature-mapped rows: ``values`` ``[..., S, F]`` and ``log_scale`` (None = 0)."""

    values: torch.Tensor
    log_scale: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """A positive-kernel feature map ``phi``; subclasses set ``name`` and implement ``_features``.

    ``estimates_exp`` is True when ``exp(lq + lk) phi(q) . phi(k)`` estimates ``exp(scale q . k)``.
    """

    head_dim: int
    name: ClassVar[str] = ""
    estimates_exp: ClassVar[bool] = False

    @property
    def feature_dim(self) -> int:
        """Number of features per row."""
        return self.head_dim

    def __call__(
        self,
        x: torch.Tensor,
        *,
        is_query: bool,
        positions: torch.Tensor | None = None,
        max_len: int | None = None,
        log_weight: torch.Tensor | None = None,
    ) -> Features:
        """Map rows of ``x`` to features.

        Args:
            x: ``[..., S, D]`` queries or keys (float32/float64).
            is_query: whether ``x`` holds queries (FAVOR+ stabilises queries and keys differently).
            positions: ``[S]`` positions of the rows (used by position-aware maps).
            max_len: the ``M`` of position re-weighting, ``max(Sq, Sk)``.
            log_weight: per-row log weights broadcastable to ``[..., S, 1]``, folded into the result.

        Returns:
            :class:`Features` with values ``[..., S, feature_dim]``.
        """
        values = self._features(x, positions, max_len)
        if log_weight is not None:
            values = values * log_weight.exp()
        return Features(values, None)

    def _features(
        self, x: torch.Tensor, positions: torch.Tensor | None, max_len: int | None
    ) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class EluFeatureMap(FeatureMap):
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al., 2020)."""

    name: ClassVar[str] = "elu"

    def _features(self, x, positions, max_len):
        return F.elu(x).add_(1.0)


@dataclass(frozen=True, eq=False)
class ReluFeatureMap(FeatureMap):
    """``phi(x) = relu(x)``."""

    name: ClassVar[str] = "relu"

    def _features(self, x, positions, max_len):
        return torch.relu(x)


@dataclass(frozen=True, eq=False)
class CosformerFeatureMap(FeatureMap):
    """cosFormer: ``phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)]``.

    ``phi(q_i) . phi(k_j) = relu(q_i) . relu(k_j) cos(pi (i - j) / 2M)``, positive for ``|i-j| < M``.
    """

    name: ClassVar[str] = "cosformer"

    @property
    def feature_dim(self) -> int:
        """Number of features per row (cos and sin halves)."""
        return 2 * self.head_dim

    def _features(self, x, positions, max_len):
        if positions is None or max_len is None:
            raise ValueError("cosformer features need positions and max_len")
        angle = positions.to(x.dtype).unsqueeze(-1) * (math.pi / (2 * max_len))
        rectified = torch.relu(x)
        return torch.cat([rectified * angle.cos(), rectified * angle.sin()], dim=-1)


def _orthogonal_gaussian(num_features: int, dim: int, seed: int) -> torch.Tensor:
    """Rows orthogonal in blocks of ``dim`` (Haar via sign-fixed QR), norms chi(dim) distributed."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q_mat, r_mat = torch.linalg.qr(gaussian)
        blocks.append((q_mat * torch.sign(torch.diagonal(r_mat))).T)
    directions = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return directions * norms.unsqueeze(1)


@dataclass(frozen=True, eq=False)
class FavorFeatureMap(FeatureMap):
    """Performer FAVOR+: positive orthogonal random features for ``exp(scale q . k)``.

    ``phi(x) = exp(w x' - |x'|^2 / 2 - stab) `` with ``x' = x sqrt(scale)``; ``stab`` is the row max
    (queries) or the max over all keys of one head (keys), returned as log-scale together with the
    ``-log(m) / 2`` normalisation, so ``E[exp(lq + lk) phi(q) . phi(k)] = exp(scale q . k)``.
    """

    num_features: int = 256
    seed: int = 0
    scale: float = 1.0
    projection: torch.Tensor = field(init=False, repr=False)
    name: ClassVar[str] = "favor"
    estimates_exp: ClassVar[bool] = True

    def __post_init__(self) -> None:
        weights = _orthogonal_gaussian(self.num_features, self.head_dim, self.seed)
        object.__setattr__(self, "projection", weights.to(torch.float32))

    @property
    def feature_dim(self) -> int:
        """Number of random features."""
        return self.num_features

    def __call__(self, x, *, is_query, positions=None, max_len=None, log_weight=None):
        """See :meth:`FeatureMap.__call__`; the log-scale holds the stabilisers."""
        x = x * math.sqrt(self.scale)
        logits = torch.matmul(x, self.projection.to(x.dtype).T)
        logits -= x.pow(2).sum(-1, keepdim=True).mul_(0.5)
        if log_weight is not None:
            logits += log_weight
        dims = -1 if is_query else (-1, -2)
        stab = logits.amax(dim=dims, keepdim=True)
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
        values = logits.sub_(stab).exp_()
        return Features(values, stab - 0.5 * math.log(self.num_features))


_FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    cls.name: cls for cls in (EluFeatureMap, ReluFeatureMap, FavorFeatureMap, CosformerFeatureMap)
}


def make_feature_map(
    name: str,
    head_dim: int,
    *,
    num_features: int | None = None,
    seed: int = 0,
    scale: float | None = None,
) -> FeatureMap:
    """Build a feature map by name.

    Args:
        name: ``"elu"``, ``"relu"``, ``"favor"`` or ``"cosformer"``.
        head_dim: query/key head dimension ``D``.
        num_features: FAVOR+ random features (default ``D * round(ln D)``, Performer's choice).
        seed: FAVOR+ projection seed.
        scale: FAVOR+ score scale (default ``D ** -0.5``); other maps are scale-free.

    Returns:
        The :class:`FeatureMap`.
    """
    if name not in _FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; known: {sorted(_FEATURE_MAPS)}")
    if name != "favor":
        return _FEATURE_MAPS[name](head_dim)
    if num_features is None:
        num_features = head_dim * max(1, round(math.log(head_dim)))
    scale = head_dim**-0.5 if scale is None else scale
    return FavorFeatureMap(head_dim, num_features=num_features, seed=seed, scale=scale)


class _Prepared(NamedTuple):
    phi_q: torch.Tensor  # [B, Hkv, G, Sq, F]
    log_q: torch.Tensor | None  # query + key log-scale, broadcastable to [B, Hkv, G, Sq, 1]
    phi_k: torch.Tensor  # [B, Hkv, Sk, F], masked keys zeroed
    value: torch.Tensor  # [B, Hkv, Sk, Dv]
    key_log_weight: torch.Tensor | None  # [B|1, Hkv|1, 1, Sk]


def _key_log_weight(mask: torch.Tensor | None, q_heads: int, kv_heads: int, dtype) -> torch.Tensor:
    """A key padding mask as log weights ``[B|1, Hkv|1, 1, Sk]`` (None stays None)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[-2] != 1:
        raise ValueError("linear attention supports key padding masks only ([B, 1, 1, Sk])")
    heads = mask.shape[1]
    if heads not in (1, kv_heads) or (heads != 1 and q_heads != kv_heads):
        raise ValueError(f"mask head dimension {heads} must be 1 (or Hq when Hq == Hkv)")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, float("-inf")
        )
    return mask.to(dtype)


def _prepare(q, k, v, feature_map: FeatureMap, mask) -> _Prepared:
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_weight = _key_log_weight(mask, q_heads, kv_heads, compute)
    max_len = max(q_len, kv_len)
    q_pos = torch.arange(q_len, device=q.device) + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=q.device)
    fq = feature_map(q.to(compute), is_query=True, positions=q_pos, max_len=max_len)
    lw_rows = None if log_weight is None else log_weight.transpose(-1, -2)
    fk = feature_map(
        k.to(compute), is_query=False, positions=k_pos, max_len=max_len, log_weight=lw_rows
    )
    shape5 = (batch, kv_heads, q_heads // kv_heads, q_len, -1)
    phi_q = fq.values.reshape(shape5)
    log_q = None
    if fq.log_scale is not None or fk.log_scale is not None:
        log_q = torch.zeros((), dtype=compute, device=q.device)
        if fq.log_scale is not None:
            log_q = log_q + fq.log_scale.reshape(*shape5[:3], *fq.log_scale.shape[-2:])
        if fk.log_scale is not None:
            if fk.log_scale.shape[-2] != 1:
                raise ValueError("a key log-scale must be constant over keys")
            log_q = log_q + fk.log_scale.unsqueeze(2)
    return _Prepared(phi_q, log_q, fk.values, v.to(compute), log_weight)


def _normalise(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    return num / (den + eps)


#: Bytes of feature rows a blocked loop materialises at a time. Fresh large buffers are costly
#: (page faults on first touch); blocks this size are reused by the allocator and stay in cache.
_BLOCK_BYTES = 4 << 20


def _block_rows(heads: int, width: int, multiple: int = 64) -> int:
    """Rows per block so that ``heads x rows x width`` fp32 values fit in :data:`_BLOCK_BYTES`."""
    rows = _BLOCK_BYTES // (4 * heads * max(width, 1))
    return max(multiple, rows // multiple * multiple)


def _rescale(reference, log_scale):
    """Move a running key log-scale reference to cover ``log_scale``: ``(new, old_f, block_f)``.

    Features of different calls carry different stabilisers; sums are kept in units of
    ``exp(reference)``: the old sum is multiplied by ``old_f`` and the new block by ``block_f``.
    """
    if log_scale is None:
        return reference, None, None
    new = log_scale if reference is None else torch.maximum(reference, log_scale)
    old = None if reference is None else torch.exp(reference - new)
    return new, old, torch.exp(log_scale - new)


class _Keys:
    """Feature-mapped key rows on demand, in the units of one running key log-scale."""

    def __init__(self, k, v, feature_map, log_weight, max_len, ones_column):
        self.k, self.v, self.feature_map, self.log_weight = k, v, feature_map, log_weight
        self.max_len, self.ones_column, self.reference = max_len, ones_column, None
        self.compute = torch.float64 if k.dtype == torch.float64 else torch.float32

    def rows(self, start: int, stop: int, carried: list[torch.Tensor]):
        """``phi(K)``, ``V`` (``[V, 1]``) of keys ``[start, stop)``; zero rows outside ``[0, Sk)``.

        ``carried`` sums are rescaled in place when the reference moves.
        """
        kv_len = self.k.shape[2]
        lo, hi = min(max(start, 0), kv_len), min(max(stop, 0), kv_len)
        hi = max(lo, hi)
        if hi == lo:
            batch, kv_heads = self.k.shape[:2]
            shape = (batch, kv_heads, stop - start)
            width = self.v.shape[-1] + int(self.ones_column)
            zeros = self.k.new_zeros(*shape, self.feature_map.feature_dim, dtype=self.compute)
            return zeros, self.k.new_zeros(*shape, width, dtype=self.compute)
        log_weight = None
        if self.log_weight is not None:
            log_weight = self.log_weight[..., lo:hi].transpose(-1, -2)
        positions = torch.arange(lo, hi, device=self.k.device)
        features = self.feature_map(
            self.k[:, :, lo:hi].to(self.compute), is_query=False, positions=positions,
            max_len=self.max_len, log_weight=log_weight,
        )  # fmt: skip
        phi = features.values
        self.reference, old, block = _rescale(self.reference, features.log_scale)
        if old is not None:
            for total in carried:
                total.mul_(old)
        if block is not None:
            phi = phi.mul_(block)
        value = self.v[:, :, lo:hi].to(self.compute)
        if self.ones_column:
            value = torch.cat([value, torch.ones_like(value[..., :1])], dim=-1)
        if lo > start or stop > hi:
            pad = (0, 0, lo - start, stop - hi)
            phi, value = F.pad(phi, pad), F.pad(value, pad)
        return phi, value


def _query_rows(q, feature_map, start: int, stop: int, kv_heads: int, kv_len: int):
    """``phi(Q)`` ``[B, Hkv, G, n, F]`` of query rows ``[start, stop)`` and their log-scale."""
    batch, q_heads, q_len, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    positions = torch.arange(start, stop, device=q.device) + (kv_len - q_len)
    features = feature_map(
        q[:, :, start:stop].to(compute), is_query=True, positions=positions,
        max_len=max(q_len, kv_len),
    )  # fmt: skip
    shape = (batch, kv_heads, q_heads // kv_heads, stop - start, -1)
    log_scale = features.log_scale
    return features.values.reshape(shape), None if log_scale is None else log_scale.reshape(shape)


def _row_log_scale(log_q, log_k):
    """``lq + lk`` per query row (``log_q [B, Hkv, G | n, ...]``, ``log_k [B, Hkv, 1, 1]``)."""
    if log_q is None and log_k is None:
        return None
    return (0.0 if log_q is None else log_q) + (0.0 if log_k is None else log_k.unsqueeze(2))


def _row_eps(eps: float, log_q, log_k):
    """``eps`` in the kernel's true units: ``eps exp(-(lq + lk))`` per row (or the float)."""
    total = _row_log_scale(log_q, log_k)
    return eps if total is None else torch.exp(-total).mul_(eps)


def _noncausal(q, k, v, feature_map: FeatureMap, log_weight, eps: float) -> torch.Tensor:
    """One key/value state per kv head (O(N F Dv)), built and applied in row blocks."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    features = feature_map.feature_dim
    keys = _Keys(k, v, feature_map, log_weight, max(q_len, kv_len), ones_column=False)
    state = torch.zeros(batch, kv_heads, features, dv, dtype=keys.compute, device=q.device)
    normaliser = torch.zeros(batch, kv_heads, features, 1, dtype=keys.compute, device=q.device)
    step = _block_rows(batch * kv_heads, features)
    for start in range(0, kv_len, step):
        phi_k, value = keys.rows(start, min(kv_len, start + step), [state, normaliser])
        state.add_(torch.matmul(phi_k.transpose(-1, -2), value))
        normaliser.add_(phi_k.sum(-2).unsqueeze(-1))
    out = torch.empty(batch, q_heads, q_len, dv, dtype=keys.compute, device=q.device)
    step = _block_rows(batch * q_heads, features)
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        phi_q, log_q = _query_rows(q, feature_map, start, stop, kv_heads, kv_len)
        row_eps = _row_eps(eps, log_q, keys.reference)
        if isinstance(row_eps, torch.Tensor):
            row_eps = row_eps.expand(*phi_q.shape[:-1], 1).reshape(batch, kv_heads, -1, 1)
        phi_q = phi_q.reshape(batch, kv_heads, -1, features)  # the group's rows share a state
        phi_q.mul_(torch.matmul(phi_q, normaliser).add_(row_eps).reciprocal_())
        out[:, :, start:stop] = torch.matmul(phi_q, state).view(batch, q_heads, stop - start, dv)
    return out


def _causal_block(phi_q, phi_k, value, init_state, chunk: int, eps):
    """Chunk form on one block of aligned rows: returns (out ``[B, Hkv, G, n, Dv]``, block sum).

    Args are ``phi_q [B, Hkv, G, n, F]``, ``phi_k [B, Hkv, n, F]``, ``value [B, Hkv, n, Dv + 1]``
    (last column ones), the state of all earlier keys ``[B, Hkv, F, Dv + 1]`` and ``eps`` (a
    float or per row ``[B, Hkv, G, n, 1]``).
    """
    batch, kv_heads, group, length, features = phi_q.shape
    width = value.shape[-1]
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        phi_q = F.pad(phi_q, (0, 0, 0, pad))
        phi_k, value = F.pad(phi_k, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
    if isinstance(eps, torch.Tensor):
        eps = F.pad(eps.expand(*phi_q.shape[:3], length, 1), (0, 0, 0, pad))
        eps = eps.view(batch, kv_heads, group, num_chunks, chunk, 1).transpose(2, 3)
        eps = eps.reshape(batch, kv_heads, num_chunks, group * chunk, 1)
    # Rows of one chunk for every query head of the group: [B, Hkv, n, G * C, F].
    phi_q = phi_q.view(batch, kv_heads, group, num_chunks, chunk, features).transpose(2, 3)
    phi_q = phi_q.reshape(batch, kv_heads, num_chunks, group * chunk, features)
    phi_k = phi_k.view(batch, kv_heads, num_chunks, chunk, features)
    value = value.view(batch, kv_heads, num_chunks, chunk, width)
    inclusive = torch.matmul(phi_k.transpose(-1, -2), value).cumsum_(2)  # [B, Hkv, n, F, Dv + 1]
    exclusive = torch.cat([torch.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    exclusive += init_state.unsqueeze(2)
    scores = torch.matmul(phi_q, phi_k.transpose(-1, -2))  # [B, Hkv, n, G * C, C]
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=scores.device).tril()
    scores.masked_fill_(~lower.repeat(group, 1), 0.0)
    out = torch.matmul(phi_q, exclusive).add_(torch.matmul(scores, value))
    out = _normalise(out[..., :-1], out[..., -1:], eps)
    out = out.view(batch, kv_heads, num_chunks, group, chunk, width - 1).transpose(2, 3)
    out = out.reshape(batch, kv_heads, group, num_chunks * chunk, width - 1)[:, :, :, :length]
    return out, inclusive[:, :, -1]


def _causal(q, k, v, feature_map: FeatureMap, log_weight, chunk: int, eps: float):
    """Causal chunk form in row blocks, carrying the state of all earlier keys between blocks."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    offset = kv_len - q_len  # query i's diagonal key is i + offset
    features = feature_map.feature_dim
    keys = _Keys(k, v, feature_map, log_weight, max(q_len, kv_len), ones_column=True)
    state = torch.zeros(batch, kv_heads, features, dv + 1, dtype=keys.compute, device=q.device)
    step = max(chunk, _block_rows(batch * q_heads, features) // chunk * chunk)
    for start in range(0, max(offset, 0), step):  # keys before the diagonal: seen by every row
        phi_k, value = keys.rows(start, min(offset, start + step), [state])
        state.add_(torch.matmul(phi_k.transpose(-1, -2), value))
    out = torch.empty(batch, q_heads, q_len, dv, dtype=keys.compute, device=q.device)
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        phi_k, value = keys.rows(start + offset, stop + offset, [state])
        phi_q, log_q = _query_rows(q, feature_map, start, stop, kv_heads, kv_len)
        row_eps = _row_eps(eps, log_q, keys.reference)
        block_out, block_state = _causal_block(phi_q, phi_k, value, state, chunk, row_eps)
        state.add_(block_state)
        out[:, :, start:stop] = block_out.reshape(batch, q_heads, stop - start, dv)
    return out


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    chunk: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Kernelised linear attention ``phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1)``.

    Non-causal: O(N F Dv) time and no ``N x N`` tensor. Causal (bottom-right aligned): chunk form
    (quadratic within ``chunk`` keys, prefix state across chunks), memory O(N (C + F Dv / C)).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the kernel's feature map (:func:`make_feature_map`).
        causal: bottom-right aligned causal rule (query ``i`` sees ``j <= i + Sk - Sq``).
        mask: key padding mask broadcastable to ``[B, 1, 1, Sk]``: bool (True = keep) or additive
            float (key weights ``exp(mask)``, so large negative values drop the key).
        chunk: chunk length of the causal form.
        eps: added to the denominator (rows that see no key give zeros).

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_weight = _key_log_weight(mask, q_heads, kv_heads, compute)
    if causal:
        out = _causal(q, k, v, feature_map, log_weight, chunk, eps)
    else:
        out = _noncausal(q, k, v, feature_map, log_weight, eps)
    return out.to(q.dtype)


def linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic-form reference of :func:`linear_attention` (materialises ``phi(Q) phi(K)^T``).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the feature map.
        causal: bottom-right aligned causal rule.
        mask: key padding mask, as in :func:`linear_attention`.
        eps: added to the denominator.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    prep = _prepare(q, k, v, feature_map, mask)
    batch, kv_heads, group, q_len, _ = prep.phi_q.shape
    kernel = torch.matmul(prep.phi_q, prep.phi_k.unsqueeze(2).transpose(-1, -2))
    if causal:
        kernel = kernel * causal_mask(q_len, k.shape[2], q.device)
    row_eps = eps if prep.log_q is None else torch.exp(-prep.log_q) * eps
    num = torch.matmul(kernel, prep.value.unsqueeze(2))
    out = _normalise(num, kernel.sum(-1, keepdim=True), row_eps)
    return out.reshape(batch, kv_heads * group, q_len, -1).to(q.dtype)


def _softmax_lse(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp (the CPU flash kernel when head sizes agree)."""
    if q.device.type == "cpu" and q.shape[-1] == v.shape[-1]:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(q, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    weights = scores.sub_(torch.where(finite, lse, 0.0).unsqueeze(-1)).exp_()
    return torch.matmul(weights, v), torch.where(finite, lse, 0.0)


#: Bytes of the per-step temporaries of the hybrid form (query rows per step follow from it).
_HYBRID_STEP_BYTES = 16 << 20


class _Layout(NamedTuple):
    """Geometry of the hybrid form in padded key coordinates (key ``j`` at ``j + left_pad``).

    Query block ``b`` (rows ``[b C, b C + C)``, C = ``chunk``) starts at padded key ``first + b C``,
    a chunk multiple, and scores the band ``[start(b), start(b) + band)`` with
    ``start(b) = first - reach + b C``; ``reach`` is the window rounded up to whole chunks.
    Linear terms inside the band only occur within ``edge`` keys of its two ends.
    """

    chunk: int
    reach: int
    left_pad: int
    num_blocks: int
    band: int
    edge: int
    first: int

    def band_start(self, block: int) -> int:
        """Padded key where block ``block``'s band starts (a chunk multiple)."""
        return self.first - self.reach + block * self.chunk


def _hybrid_layout(q_len: int, kv_len: int, window: int, causal: bool, chunk: int) -> _Layout:
    offset = kv_len - q_len
    reach = -(-window // chunk) * chunk
    left_pad = max(0, reach - offset)
    left_pad += -(offset + left_pad) % chunk
    band = chunk + reach * (1 if causal else 2)
    edge = min(band, reach - window + chunk - 1)
    return _Layout(chunk, reach, left_pad, -(-q_len // chunk), band, edge, offset + left_pad)


def _band_masks(layout: _Layout, window: int, causal: bool, group: int, device):
    """Row x band masks: ``inside`` the window, and ``linear`` (visible but outside it)."""
    rows = torch.arange(layout.chunk, device=device).unsqueeze(1)
    diff = torch.arange(layout.band, device=device).unsqueeze(0) - layout.reach - rows
    inside = (diff >= -window) & (diff <= (0 if causal else window))
    linear = diff < -window if causal else ~inside
    return inside.repeat(group, 1), linear.repeat(group, 1)


def _edges(linear: torch.Tensor, layout: _Layout, causal: bool) -> list:
    """``(band offset, mask)`` of the band columns where the linear part applies."""
    if layout.edge <= 0:
        return []
    if causal:
        return [(0, linear[:, : layout.edge])]
    if 2 * layout.edge >= layout.band:  # the two edges overlap: one span, the whole band
        return [(0, linear)]
    return [(0, linear[:, : layout.edge]), (layout.band - layout.edge, linear[:, -layout.edge :])]


def _windows(x: torch.Tensor, start: int, size: int, chunk: int, count: int) -> torch.Tensor:
    """Views ``x[..., start + c chunk : ... + size, :]`` for ``c < count``, stacked (no copy)."""
    return x[..., start:, :].unfold(-2, size, chunk)[..., :count, :, :].transpose(-1, -2)


def _rows(x: torch.Tensor, start: int, stop: int, fill: float = 0.0) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``x [..., S, X]``, ``fill`` where outside ``[0, S)``."""
    length = x.shape[-2]
    lo, hi = min(max(start, 0), length), min(max(stop, 0), length)
    out = x.new_full((*x.shape[:-2], stop - start, x.shape[-1]), fill)
    if hi > lo:
        out[..., lo - start : hi - start, :] = x[..., lo:hi, :]
    return out


def _chunk_states(phi_k: torch.Tensor, value: torch.Tensor, chunk: int) -> torch.Tensor:
    """``phi(K_c)^T [V_c, 1]`` of consecutive chunks: ``[B, Hkv, n, F, Dv + 1]``."""
    batch, kv_heads, length, features = phi_k.shape
    phi_k = phi_k.reshape(batch, kv_heads, length // chunk, chunk, features)
    value = value.reshape(batch, kv_heads, length // chunk, chunk, value.shape[-1])
    return torch.matmul(phi_k.transpose(-1, -2), value)


def _merge(soft, log_soft, parts) -> torch.Tensor:
    """``(e^{a-m} soft + sum e^{b-m} num_b) / (e^{a-m} + sum e^{b-m} den_b)``, m the max exponent.

    ``soft`` is normalised softmax output with log-sum-exp ``a``; ``parts`` are ``(lin, b)`` with
    ``lin = [num, den]`` on the last axis and log-scale ``b`` (None = 0).
    """
    zero = torch.zeros((), dtype=soft.dtype, device=soft.device)
    logs = [zero if log is None else log for _, log in parts]
    row_max = log_soft
    for log in logs:
        row_max = torch.maximum(row_max, log)
    den = torch.exp(log_soft - row_max)
    num = soft.mul_(den)
    dv = soft.shape[-1]
    for (lin, _), log in zip(parts, logs):
        weight = torch.exp(log - row_max)
        num.add_(lin[..., :dv] * weight)
        den = den + lin[..., dv:] * weight
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


class _Hybrid:
    """One hybrid-attention call: query blocks in steps, linear sums carried between steps."""

    def __init__(self, q, k, v, feature_map, log_weight, *, window, causal, scale, chunk):
        self.q, self.k, self.v, self.feature_map = q, k, v, feature_map
        self.window, self.causal, self.scale = window, causal, scale
        batch, q_heads, q_len, _ = q.shape
        self.kv_heads, self.kv_len = k.shape[1], k.shape[2]
        self.layout = _hybrid_layout(q_len, self.kv_len, window, causal, chunk)
        self.compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.log_weight = log_weight
        width = max(feature_map.feature_dim, q.shape[-1] + v.shape[-1], self.layout.band // 4)
        rows = _HYBRID_STEP_BYTES // (4 * batch * q_heads * width)
        self.blocks_per_step = max(1, min(rows, 4096) // chunk)
        group = q_heads // self.kv_heads
        inside, linear = _band_masks(self.layout, window, causal, group, q.device)
        self.window_bias = torch.zeros(inside.shape, dtype=self.compute, device=q.device)
        self.window_bias.masked_fill_(~inside, float("-inf"))
        self.edges = _edges(linear, self.layout, causal)
        no_mask = torch.zeros(1, 1, self.kv_len, 1, dtype=self.compute, device=q.device)
        self.key_bias = no_mask if log_weight is None else log_weight.transpose(-1, -2)

    def keys(self) -> _Keys:
        q_len = self.q.shape[2]
        max_len = max(q_len, self.kv_len)
        return _Keys(self.k, self.v, self.feature_map, self.log_weight, max_len, True)

    def zero_state(self) -> torch.Tensor:
        shape = (self.q.shape[0], self.kv_heads, self.feature_map.feature_dim, self.v.shape[-1] + 1)
        return torch.zeros(shape, dtype=self.compute, device=self.q.device)

    def steps(self, reverse: bool = False):
        """``(first block, number of blocks)`` of every step."""
        firsts = range(0, self.layout.num_blocks, self.blocks_per_step)
        for first in reversed(firsts) if reverse else firsts:
            yield first, min(self.blocks_per_step, self.layout.num_blocks - first)

    def absorb(self, keys: _Keys, total: torch.Tensor, start: int, stop: int) -> None:
        """Add ``phi(K)^T [V, 1]`` of padded keys ``[start, stop)`` to ``total``."""
        step = _block_rows(total.shape[0] * total.shape[1], self.feature_map.feature_dim)
        pad = self.layout.left_pad
        for lo in range(start, stop, step):
            phi_k, value = keys.rows(lo - pad, min(stop, lo + step) - pad, [total])
            total.add_(torch.matmul(phi_k.transpose(-1, -2), value))

    def query_blocks(self, first: int, count: int):
        """``phi(Q)``, its log-scale (or None) and q of ``count`` blocks: ``[B, Hkv, n, R, X]``."""
        chunk, q_len = self.layout.chunk, self.q.shape[2]
        start, stop = first * chunk, min(q_len, (first + count) * chunk)
        phi, log_q = _query_rows(self.q, self.feature_map, start, stop, self.kv_heads, self.kv_len)
        q = self.q[:, :, start:stop].to(self.compute).reshape(*phi.shape[:4], -1)
        return [None if x is None else self.to_blocks(x, count) for x in (phi, log_q, q)]

    def to_blocks(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """``[B, Hkv, G, rows, X]`` -> ``[B, Hkv, count, G C, X]`` (zero padded rows)."""
        batch, kv_heads, group, length, width = x.shape
        chunk = self.layout.chunk
        if length != count * chunk:
            x = F.pad(x, (0, 0, 0, count * chunk - length))
        x = x.reshape(batch, kv_heads, group, count, chunk, width).transpose(2, 3)
        return x.reshape(batch, kv_heads, count, group * chunk, width)

    def right_parts(self):
        """Non-causal: per row ``phi(q) [S, z]`` over the keys after its block's band.

        Runs backwards, so each block's suffix is a sum of exactly its keys (no cancellation).
        Returns ``[B, Hkv, n, R, Dv + 1]`` and the log-scale per row (None without one).
        """
        layout, chunk = self.layout, self.layout.chunk
        keys, suffix = self.keys(), self.zero_state()
        after_last = layout.band_start(layout.num_blocks - 1) + layout.band
        self.absorb(keys, suffix, after_last, layout.left_pad + self.kv_len)
        parts = logs = None
        for first, count in self.steps(reverse=True):
            start = layout.band_start(first) + layout.band - layout.left_pad
            phi_k, value = keys.rows(start, start + count * chunk, [suffix])
            within = _chunk_states(phi_k, value, chunk).flip(2).cumsum(2).flip(2)
            phi_q, log_q, _ = self.query_blocks(first, count)
            part = torch.matmul(phi_q, within.add_(suffix.unsqueeze(2)))
            suffix.copy_(within[:, :, 0])
            if parts is None:
                parts = part.new_empty(*part.shape[:2], layout.num_blocks, *part.shape[3:])
            parts[:, :, first : first + count] = part
            log = _row_log_scale(log_q, keys.reference)
            if log is not None:
                if logs is None:
                    logs = log.new_empty(*log.shape[:2], layout.num_blocks, *log.shape[3:])
                logs[:, :, first : first + count] = log
        return parts, logs

    def softmax_part(self, q_blocks, start: int, stop: int, count: int):
        """Windowed softmax of ``count`` blocks over padded keys ``[start, stop)``, and its lse."""
        layout, chunk, pad = self.layout, self.layout.chunk, self.layout.left_pad
        keys = _rows(self.k, start - pad, stop - pad).to(self.compute)
        values = _rows(self.v, start - pad, stop - pad).to(self.compute)
        key_bias = _rows(self.key_bias, start - pad, stop - pad, float("-inf"))
        band_bias = _windows(key_bias, 0, layout.band, chunk, count).transpose(-1, -2)
        bias = self.window_bias + band_bias  # [B | 1, Hkv | 1, count, R, band]
        has_key = (bias > float("-inf")).any(-1, keepdim=True)
        soft = q_blocks.new_empty(*q_blocks.shape[:-1], self.v.shape[-1])
        log_soft = q_blocks.new_empty(*q_blocks.shape[:-1], 1)
        for index in range(q_blocks.shape[0]):
            bias_index = min(index, bias.shape[0] - 1)
            bias_b = bias[bias_index].expand(self.kv_heads, *bias.shape[2:])
            window_keys = _windows(keys[index], 0, layout.band, chunk, count)
            window_values = _windows(values[index], 0, layout.band, chunk, count)
            out, lse = _softmax_lse(q_blocks[index], window_keys, window_values, bias_b, self.scale)
            soft[index] = out
            log_soft[index] = torch.where(has_key[bias_index], lse.unsqueeze(-1), float("-inf"))
        return soft, log_soft

    def run(self) -> torch.Tensor:
        """The hybrid output ``[B, Hq, Sq, Dv]`` (compute dtype)."""
        layout, chunk = self.layout, self.layout.chunk
        right, right_log = (None, None) if self.causal else self.right_parts()
        keys, prefix = self.keys(), self.zero_state()
        self.absorb(keys, prefix, 0, layout.band_start(0))
        out = None
        for first, count in self.steps():
            start = layout.band_start(first)
            stop = start + (count - 1) * chunk + layout.band
            phi_k, value = keys.rows(start - layout.left_pad, stop - layout.left_pad, [prefix])
            inclusive = _chunk_states(
                phi_k[:, :, : count * chunk], value[:, :, : count * chunk], chunk
            )
            inclusive = inclusive.cumsum_(2)
            exclusive = torch.cat([torch.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], 2)
            phi_q, log_q, q_blocks = self.query_blocks(first, count)
            lin = torch.matmul(phi_q, exclusive.add_(prefix.unsqueeze(2)))
            for offset, mask in self.edges:
                edge_keys = _windows(phi_k, offset, mask.shape[-1], chunk, count)
                kernel = torch.matmul(phi_q, edge_keys.transpose(-1, -2)).masked_fill_(~mask, 0.0)
                lin += torch.matmul(kernel, _windows(value, offset, mask.shape[-1], chunk, count))
            prefix.add_(inclusive[:, :, -1])
            parts = [(lin, _row_log_scale(log_q, keys.reference))]
            if right is not None:
                blocks = slice(first, first + count)
                parts.append(
                    (right[:, :, blocks], None if right_log is None else right_log[:, :, blocks])
                )
            soft, log_soft = self.softmax_part(q_blocks, start, stop, count)
            merged = _merge(soft, log_soft, parts)
            if out is None:
                out = merged.new_empty(*merged.shape[:2], layout.num_blocks, *merged.shape[3:])
            out[:, :, first : first + count] = merged
        batch, kv_heads, q_len, dv = (
            self.q.shape[0],
            self.kv_heads,
            self.q.shape[2],
            self.v.shape[-1],
        )
        group = self.q.shape[1] // kv_heads
        out = out.view(batch, kv_heads, layout.num_blocks, group, chunk, dv).transpose(2, 3)
        out = out.reshape(batch, kv_heads, group, layout.num_blocks * chunk, dv)[:, :, :, :q_len]
        return out.reshape(batch, kv_heads * group, q_len, dv)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    window: int,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """Exact softmax inside a local window plus linear attention outside it, one normalisation.

    With ``p_i = i + Sk - Sq`` the window ``W_i`` is ``|j - p_i| <= window`` (causal:
    ``p_i - window <= j <= p_i``); the linear part covers the other visible keys ``O_i``. The
    linear kernel is ``exp(lq_i + lk) phi(q_i) . phi(k_j)`` (see :class:`Features`); with
    ``b_i = lq_i + lk``, ``a_i = log sum_{W_i} e^{s_ij}`` and ``m_i = max(a_i, b_i)``::

        out_i = (sum_{W_i} e^{s_ij - m_i} v_j + e^{b_i - m_i} phi(q_i) S_i)
              / (sum_{W_i} e^{s_ij - m_i}     + e^{b_i - m_i} phi(q_i) z_i),
        S_i = sum_{O_i} phi(k_j) v_j^T,  z_i = sum_{O_i} phi(k_j):

    numerators and denominators of both parts summed, all scaled by the same ``e^{-m_i}`` (every
    exponent <= 0, so nothing overflows). For FAVOR+ the linear kernel estimates ``e^{s_ij}`` and
    this approximates softmax; for elu/relu/cosformer ``b_i = 0`` and the kernel values are mixed
    with ``e^{s_ij}`` as they are.

    Computation: query blocks of ``chunk`` rows, all alike after padding the keys. The softmax
    part of a block runs over a key band of ``chunk + 2 ceil(window / chunk) chunk`` keys with the
    window as an additive mask (the CPU flash kernel, which also returns ``a_i``; all blocks of a
    step in one call, the bands as overlapping views). Keys beyond the band enter through chunk
    prefix (non-causal: and suffix) sums of ``phi(K_c)^T [V_c, 1]``, which add up exactly the
    wanted keys so nothing cancels; band keys outside a row's window, which only occur within
    ``edge`` keys of the band's ends, through a masked ``phi(Q) phi(K)^T`` of that width.
    Time O(N (chunk + 2 window) D + N F Dv), memory O(N (D + F) + N F Dv / chunk).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the linear part's feature map (FAVOR+ must use the same ``scale``).
        window: local window radius ``w >= 0``.
        causal: bottom-right aligned causal rule.
        mask: key padding mask, as in :func:`linear_attention`.
        scale: score scale (default: the feature map's ``scale`` if it has one, else ``D ** -0.5``).
        chunk: query block and key chunk length.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype; rows that see no key are zeros.
    """
    scale = _hybrid_scale(feature_map, q.shape[-1], scale)
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_weight = _key_log_weight(mask, q_heads, kv_heads, compute)
    hybrid = _Hybrid(
        q, k, v, feature_map, log_weight, window=window, causal=causal, scale=scale, chunk=chunk
    )
    return hybrid.run().to(q.dtype)


def _hybrid_scale(feature_map: FeatureMap, head_dim: int, scale: float | None) -> float:
    map_scale = getattr(feature_map, "scale", None)
    if scale is None:
        return map_scale if map_scale is not None else head_dim**-0.5
    if feature_map.estimates_exp and map_scale is not None and not math.isclose(scale, map_scale):
        raise ValueError(f"scale {scale} differs from the feature map's scale {map_scale}")
    return scale


def hybrid_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    window: int,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Quadratic-form reference of :func:`hybrid_attention` (full ``Sq x Sk`` matrices).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the linear part's feature map.
        window: local window radius.
        causal: bottom-right aligned causal rule.
        mask: key padding mask, as in :func:`linear_attention`.
        scale: score scale, as in :func:`hybrid_attention`.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    scale = _hybrid_scale(feature_map, q.shape[-1], scale)
    prep = _prepare(q, k, v, feature_map, mask)
    batch, kv_heads, group, q_len, _ = prep.phi_q.shape
    kv_len = k.shape[2]
    keys = k.to(prep.value.dtype).unsqueeze(2)
    scores = torch.matmul(
        q.to(keys.dtype).reshape(prep.phi_q.shape[:4] + (-1,)), keys.transpose(-1, -2)
    )
    scores = scores * scale
    if prep.key_log_weight is not None:
        scores = scores + prep.key_log_weight.unsqueeze(2)
    right = 0 if causal else window
    inside = visible_keys_mask(
        q_len, kv_len, window_left=window, window_right=right, device=q.device
    )
    visible = causal_mask(q_len, kv_len, q.device) if causal else torch.ones_like(inside)
    scores = scores.masked_fill(~inside, float("-inf"))
    log_lin = prep.log_q if prep.log_q is not None else torch.zeros((), dtype=scores.dtype)
    row_max = torch.maximum(scores.amax(-1, keepdim=True), log_lin)
    kernel = torch.matmul(prep.phi_q, prep.phi_k.unsqueeze(2).transpose(-1, -2))
    kernel = kernel * torch.exp(log_lin - row_max) * (visible & ~inside)
    weights = torch.exp(scores - row_max) + kernel
    num = torch.matmul(weights, prep.value.unsqueeze(2))
    den = weights.sum(-1, keepdim=True)
    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    return out.reshape(batch, kv_heads * group, q_len, -1).to(q.dtype)
