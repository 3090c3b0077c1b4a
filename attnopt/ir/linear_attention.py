"""The ``linear`` and ``hybrid`` variants' definition: feature maps and quadratic-form references.

Entry points: :func:`make_feature_map`, :func:`feature_map_for` and the :class:`FeatureMap` family;
:func:`prepare_features`, :func:`key_log_weight`, :func:`mix_parts`; the references
:func:`linear_attention_reference` and :func:`hybrid_attention_reference`. The fast kernels
(:mod:`attnopt.runtime.cpu.linear`, :mod:`attnopt.runtime.cpu.hybrid`, the Triton linear kernels)
use the same feature maps and are tested against these references.

A linear kernel is ``k(q_i, k_j) = exp(lq_i + lk) phi(q_i) . phi(k_j)``: every feature map returns
its features and an optional log-scale (FAVOR+ keeps its features in [0, 1] by max subtraction and
reports the subtracted maxima there). A key log-scale is one number per (batch, kv head) and call;
sums over keys from different calls are kept in the units of one running reference
(``attnopt.runtime.cpu.linear_features.rescale``), so they stay exact. It cancels in linear attention and matters when a linear
part is added to an exact softmax part (hybrid attention), and for ``eps``, which is added in the
kernel's true units.

Key padding masks (bool, True = keep, or additive float) become per-key log weights ``lw_j``
(``0`` / ``-inf`` for bool): softmax parts add them to the scores, linear parts multiply
``phi(k_j)`` by ``exp(lw_j)``, so a masked key contributes nothing to either.

Positions follow the op's bottom-right alignment: query ``i`` sits at ``i + Sk - Sq``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from attnopt.ir.attention_reference import causal_mask, visible_keys_mask

__all__ = [
    "CosformerFeatureMap",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "Features",
    "PreparedFeatures",
    "ReluFeatureMap",
    "feature_map_for",
    "hybrid_attention_reference",
    "hybrid_scale",
    "key_log_weight",
    "zero_masked_keys",
    "linear_attention_reference",
    "make_feature_map",
    "mix_parts",
    "prepare_features",
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


@functools.lru_cache(maxsize=64)
def _cached_feature_map(
    name: str, head_dim: int, num_features: int, seed: int, scale: float
) -> FeatureMap:
    return make_feature_map(
        name, head_dim, num_features=num_features or None, seed=seed, scale=scale
    )


def feature_map_for(
    feature_map: str, head_dim: int, *, num_features: int = 0, seed: int = 0, scale: float
) -> FeatureMap:
    """The feature map a ``linear`` / ``hybrid`` node uses (built once per configuration).

    Args:
        feature_map: the node's ``feature_map`` attribute.
        head_dim: query/key head dimension.
        num_features: the node's ``num_features`` (0: the map's default).
        seed: the node's ``seed``.
        scale: the node's score ``scale``.

    Returns:
        The :class:`FeatureMap`.
    """
    return _cached_feature_map(feature_map, head_dim, num_features, seed, scale)


class PreparedFeatures(NamedTuple):
    """Feature-mapped q and k of one call, grouped by kv head, with their log-scales."""

    phi_q: torch.Tensor  # [B, Hkv, G, Sq, F]
    log_q: torch.Tensor | None  # query + key log-scale, broadcastable to [B, Hkv, G, Sq, 1]
    phi_k: torch.Tensor  # [B, Hkv, Sk, F], masked keys zeroed
    value: torch.Tensor  # [B, Hkv, Sk, Dv]
    key_log_weight: torch.Tensor | None  # [B|1, Hkv|1, 1, Sk]


def key_log_weight(mask: torch.Tensor | None, q_heads: int, kv_heads: int, dtype):
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


def zero_masked_keys(k: torch.Tensor, v: torch.Tensor, log_weight: torch.Tensor | None):
    """``k`` and ``v`` with the keys a mask hides (log weight -inf) zeroed: they contribute
    nothing, and an inf or NaN there would turn their zero weight into NaN (0 * inf)."""
    if log_weight is None:
        return k, v
    hidden = torch.isneginf(log_weight).transpose(-1, -2)  # [B|1, Hkv|1, Sk, 1]
    return k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0)


def prepare_features(q, k, v, feature_map: FeatureMap, mask) -> PreparedFeatures:  # noqa: ANN001
    """Feature-map q and k (masked keys weighted by their log weights), grouped per kv head."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_weight = key_log_weight(mask, q_heads, kv_heads, compute)
    k, v = zero_masked_keys(k, v, log_weight)
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
    return PreparedFeatures(phi_q, log_q, fk.values, v.to(compute), log_weight)


def mix_parts(soft, log_soft, lin_avg, log_lin_mass) -> torch.Tensor:
    """``(e^{a-m} soft + e^{c-m} lin_avg) / (e^{a-m} + e^{c-m})`` with ``m = max(a, c)``.

    Two normalised parts with their log masses (``-inf``: empty part); both weights are <= 1 and
    the larger is 1, so nothing over- or underflows; rows where both parts are empty are zeros.
    """
    row_max = torch.maximum(log_soft, log_lin_mass)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weight_soft = torch.exp(log_soft - row_max)
    weight_lin = torch.exp(log_lin_mass - row_max)
    num = soft.mul_(weight_soft).add_(lin_avg * weight_lin)
    den = weight_soft.add_(weight_lin)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The ``linear`` variant, quadratic form (materialises ``phi(Q) phi(K)^T``).

    ``out_i = sum_j k(q_i, k_j) v_j / (sum_j k(q_i, k_j) + eps)``, ``k`` the feature-map kernel.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the feature map.
        causal: bottom-right aligned causal rule.
        mask: key padding mask (bool True = keep, or additive), ``[B, 1, 1, Sk]``-shaped.
        eps: added to the denominator in the kernel's true units.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    prep = prepare_features(q, k, v, feature_map, mask)
    batch, kv_heads, group, q_len, _ = prep.phi_q.shape
    kernel = torch.matmul(prep.phi_q, prep.phi_k.unsqueeze(2).transpose(-1, -2))
    if causal:
        kernel = kernel * causal_mask(q_len, k.shape[2], q.device)
    row_eps = eps if prep.log_q is None else torch.exp(-prep.log_q) * eps
    num = torch.matmul(kernel, prep.value.unsqueeze(2))
    out = num / (kernel.sum(-1, keepdim=True) + row_eps)
    return out.reshape(batch, kv_heads * group, q_len, -1).to(q.dtype)


def hybrid_scale(feature_map: FeatureMap, head_dim: int, scale: float | None) -> float:
    """The softmax part's scale: ``scale``, else the feature map's, else ``D ** -0.5``."""
    map_scale = getattr(feature_map, "scale", None)
    if scale is None:
        return map_scale if map_scale is not None else head_dim**-0.5
    if feature_map.estimates_exp and map_scale is not None and not math.isclose(scale, map_scale):
        raise ValueError(f"scale {scale} differs from the feature map's scale {map_scale}")
    return scale


def hybrid_attention_reference(
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
    """The ``hybrid`` variant, quadratic form: exact softmax inside the window, linear outside.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the linear part's feature map.
        window: local window radius.
        causal: bottom-right aligned causal rule.
        mask: key padding mask, as in :func:`linear_attention_reference`.
        scale: score scale of the softmax part (default: the feature map's, else ``D ** -0.5``).

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    scale = hybrid_scale(feature_map, q.shape[-1], scale)
    if q.shape[2] == 0 or k.shape[2] == 0:  # no rows, or rows without keys: zeros
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    prep = prepare_features(q, k, v, feature_map, mask)
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
    values = prep.value.unsqueeze(2)
    log_soft = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf: no key in the window
    weights = torch.exp(scores - torch.where(torch.isfinite(log_soft), log_soft, 0.0))
    soft = torch.matmul(weights, values)
    kernel = torch.matmul(prep.phi_q, prep.phi_k.unsqueeze(2).transpose(-1, -2))
    kernel = kernel * (visible & ~inside)
    lin_den = kernel.sum(-1, keepdim=True)
    lin_avg = torch.matmul(kernel, values) / lin_den.clamp_min(torch.finfo(lin_den.dtype).tiny)
    log_mass = torch.log(lin_den) + (0.0 if prep.log_q is None else prep.log_q)
    out = mix_parts(soft, log_soft, lin_avg, log_mass)
    return out.reshape(batch, kv_heads * group, q_len, -1).to(q.dtype)
