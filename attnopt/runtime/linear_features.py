"""Feature maps and key handling shared by the linear and hybrid attention kernels (issue 6).

Entry points: :func:`make_feature_map` and the :class:`FeatureMap` family (re-exported by
:mod:`attnopt.runtime.cpu_linear`); the underscored helpers serve ``cpu_linear`` and ``cpu_hybrid``.

A linear kernel is ``k(q_i, k_j) = exp(lq_i + lk) phi(q_i) . phi(k_j)``: every feature map returns
its features and an optional log-scale (FAVOR+ keeps its features in [0, 1] by max subtraction and
reports the subtracted maxima there). A key log-scale is one number per (batch, kv head) and call;
sums over keys from different calls are kept in the units of one running reference
(:func:`_rescale`), so they stay exact. It cancels in linear attention and matters when a linear
part is added to an exact softmax part (hybrid attention), and for ``eps``, which is added in the
kernel's true units.

Key padding masks (bool, True = keep, or additive float) become per-key log weights ``lw_j``
(``0`` / ``-inf`` for bool): softmax parts add them to the scores, linear parts multiply
``phi(k_j)`` by ``exp(lw_j)``, so a masked key contributes nothing to either.

Positions follow the op's bottom-right alignment: query ``i`` sits at ``i + Sk - Sq``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "CosformerFeatureMap",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "Features",
    "ReluFeatureMap",
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

    ``phi(x) = exp(w x' - |x'|^2 / 2 - stab)`` with ``x' = x sqrt(scale)`` and ``w`` the rows of
    :attr:`projection` (orthogonal in blocks of ``D``, chi-distributed norms). Performer's stable
    form: ``stab`` is the row max for queries and the max over the call's keys of one (batch,
    head) for keys (unmasked keys only), so features lie in [0, 1]; it is returned as log-scale
    together with the ``-log(m) / 2`` normalisation, so that
    ``E[exp(lq + lk) phi(q) . phi(k)] = exp(scale q . k)`` (unbiased; error ~ ``1 / sqrt(m)``).
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

    def __call__(
        self,
        x: torch.Tensor,
        *,
        is_query: bool,
        positions: torch.Tensor | None = None,
        max_len: int | None = None,
        log_weight: torch.Tensor | None = None,
    ) -> Features:
        """Positive random features of ``x``.

        Args:
            x: ``[..., S, D]`` queries or keys.
            is_query: queries get one stabiliser per row, keys one per (batch, head).
            positions: unused.
            max_len: unused.
            log_weight: per-key log weights (masks), folded in before the stabiliser.

        Returns:
            :class:`Features` ``[..., S, num_features]`` with the stabilisers as log-scale.
        """
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


def _key_log_weight(mask: torch.Tensor | None, q_heads: int, kv_heads: int, dtype):
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
