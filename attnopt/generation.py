"""Text generation with a compiled decoder: a prefill and a decode program over a static cache.

Entry points: :class:`Generator` (what ``CompiledModule.generate`` runs), :class:`PrefillStep`
and :class:`DecodeStep` (the two programs' modules).

A decoder-only causal LM is captured twice, each time with symbolic batch and length, and compiled
once for every later call:
- **prefill** (:class:`PrefillStep`): the prompt ``[B, P]`` -> the last position's logits and every
  layer's keys and values (transformers' own dynamic cache, started empty, inside the graph);
- **decode** (:class:`DecodeStep`): one token per row, the mask and positions, and the caches
  ``[B, kv_heads, P, head_dim]`` -> logits and the caches one position longer. Its graph grows each
  cache with ``kv_append`` (the ``static-kv-cache`` pass), which the runtime writes in place into a
  buffer allocated once for the prompt plus every new token: a step reads the cache, it never
  copies it. Attention over the valid prefix runs the decode kernel (split over the cache length,
  one pass per KV head for its query group) when the shape calls for it.

The loop follows ``model.generate``'s rules for the options it takes (greedy and sampling, with
transformers' own logits processors for temperature, top-k, top-p, repetition penalty, minimum
length ...), positions from the attention mask as ``generate`` computes them (left padding), EOS
and pad handling. The prefill runs the user's pipeline; the decode program is exact.
"""

from __future__ import annotations

import copy
import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnopt.errors import GenerationError
from attnopt.runtime.kv_cache import static_cache

__all__ = [
    "DECODE_PIPELINE",
    "DecodeStep",
    "GenerationStats",
    "Generator",
    "PrefillStep",
    "Streaming",
    "streaming_of",
]

#: The decode program's passes: exact fusion, and caches grown in place.
DECODE_PIPELINE = "canonicalize,fuse-attention,static-kv-cache"

#: ``generate`` options this driver implements beyond the logits processors' own.
_UNSUPPORTED = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "num_assistant_tokens": None,
    "prompt_lookup_num_tokens": None,
    "assistant_model": None,
    "streamer": None,
    "penalty_alpha": None,
    "constraints": None,
    "guidance_scale": None,
}


def _cache_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes its cache by (``cache`` in transformers 5)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _flat_cache(cache: Any) -> tuple[torch.Tensor, ...]:
    """Keys and values of every layer, in layer order: ``(k0, v0, k1, v1, ...)``."""
    return tuple(t for layer in cache.layers for t in (layer.keys, layer.values))


class _Step(nn.Module):
    """A step module: the causal LM called with a transformers cache it builds.

    Args:
        model: a transformers causal LM (its own dynamic cache runs inside the captured graph).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._cache_keyword = _cache_keyword(model)

    def _call(
        self,
        cache: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The last position's logits and the cache's keys and values after the call."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_keyword: cache},
        )
        return out.logits[:, -1], _flat_cache(cache)


class PrefillStep(_Step):
    """The prompt pass: ``(input_ids, attention_mask, position_ids)`` -> the last position's
    logits and every layer's keys and values, as a flat tuple.

    Args:
        model: a transformers causal LM (its own dynamic cache runs inside the captured graph).
    """

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits ``[B, vocab]`` of the last position and ``(k0, v0, k1, v1, ...)``."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        return self._call(cache, input_ids, attention_mask, position_ids)


class DecodeStep(_Step):
    """One decoding step: ``(input_ids [B, T], attention_mask [B, P+T], position_ids [B, T],
    past)`` -> logits ``[B, vocab]`` of the last position and the caches ``P + T`` long.

    ``past`` is ``[k0, v0, k1, v1, ...]``, each ``[B, kv_heads, P, head_dim]``. Captured with a
    symbolic batch and cache length (:meth:`attnopt_dynamic_shapes`); ``T`` is fixed at capture.

    Args:
        model: a transformers causal LM.
    """

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits of the last position and the grown caches."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if len(cache.layers) != len(past) // 2:
            raise GenerationError(
                f"{type(self.model).__name__}'s cache has {len(cache.layers)} layers, and "
                f"{len(past) // 2} were given"
            )
        for layer, index in zip(cache.layers, range(0, len(past), 2), strict=True):
            # The layer holds the given tensors as they are: transformers' own constructor
            # (ddp_cache_data) concatenates them onto an empty tensor, a copy per step.
            keys, values = past[index], past[index + 1]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = keys.shape[-2]
        return self._call(cache, input_ids, attention_mask, position_ids)

    def attnopt_dynamic_shapes(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Batch and cache length symbolic; the step's token count static (see
        :func:`attnopt.frontend.capture.dynamic_shapes_for`)."""
        from torch.export import Dim

        past = kwargs["past"] if "past" in kwargs else args[3]
        steps = (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]
        # A model's own sliding window bounds the cache length the graph is valid for (its
        # cache layers branch on reaching it); generate() refuses longer requests.
        window = getattr(self.model.config, "sliding_window", None)
        upper = int(window) - 1 - steps if window else None
        batch = Dim("batch", min=1)
        length = Dim("past", min=1) if upper is None else Dim("past", min=1, max=upper)
        return {
            "input_ids": {0: batch},
            "attention_mask": {0: batch, 1: length + steps},
            "position_ids": {0: batch},
            "past": [{0: batch, 2: length} for _ in past],
        }


@dataclass
class GenerationStats:
    """Times and counts of the last :meth:`Generator.generate` call.

    Attributes:
        prompt_tokens: prompt length (padded).
        new_tokens: tokens generated per row (up to the first stop of every row).
        prefill_seconds: the prompt pass, including its compilation on a first call.
        decode_seconds: every decode step, including compilation on a first call.
        compile_seconds: compilation inside those (first call, or a new structure).
        cache_capacity: positions allocated per layer for keys and values.
        token_seconds: see the field.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    cache_capacity: int = 0
    #: Seconds from the first decode step's start to the end of each step (with
    #: ``generate(..., record_steps=True)``; None otherwise).
    token_seconds: list[float] | None = None


#: ``compile_step(module, pipeline_text_or_None)`` -> a callable compiled module; ``None`` means
#: the pipeline the user compiled with.
StepCompiler = Callable[[nn.Module, "str | None"], Any]


def _absolute_position_limit(model: nn.Module) -> int | None:
    """Rows of a learned absolute position table (GPT-2's ``wpe``), which a longer sequence
    would index past; None for rotary and relative models."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, nn.Embedding) and (
            leaf in ("wpe", "embed_positions") or "position_embedding" in leaf
        ):
            return module.num_embeddings
    return None


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise GenerationError(
            f"{name} is not a transformers model (it has no config): generate() drives "
            "transformers causal LMs (AutoModelForCausalLM); call the compiled module directly "
            "for other models"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise GenerationError(
            f"{name} is an encoder-decoder model: attnopt's generate() serves decoder-only "
            "causal LMs so far; compile the model and call it, or use model.generate()"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise GenerationError(
            f"{name} has no causal LM head (get_output_embeddings() is None): generate() needs "
            "logits over the vocabulary; load the model with AutoModelForCausalLM"
        )
    if getattr(model, "generation_config", None) is None:
        raise GenerationError(
            f"{name} has no generation_config: generate() takes its defaults (EOS, pad, "
            "max_length) from it; load the model with AutoModelForCausalLM"
        )


@dataclass(frozen=True)
class Streaming:
    """StreamingLLM decoding: the cache keeps the first ``sinks`` positions and the ``window``
    most recent ones; the rest are evicted.

    It is what ``sliding-window{window,sinks}`` means for every query (a query at position ``t``
    sees keys ``j <= t`` with ``j < sinks`` or ``t - j <= window``), so decode steps stay exact
    with respect to the windowed model while the cache, the step's time and the memory stay
    bounded. Positions are the tokens' own (rotary models see their true distances), not
    StreamingLLM's re-numbering inside the cache.

    Attributes:
        window: recent keys kept besides the query's own.
        sinks: leading keys kept.
    """

    window: int
    sinks: int

    @property
    def capacity(self) -> int:
        """Cache positions a step needs: sinks, the window, and the new token."""
        return self.sinks + self.window + 1


def streaming_of(passes: Any) -> tuple[Streaming | None, str | None]:
    """The streaming cache a pipeline asks for, or why its sliding window applies to the prefill
    only.

    Args:
        passes: the pipeline's passes.

    Returns:
        ``(streaming, None)`` for one ``sliding-window`` pass over every site, layer and head;
        ``(None, reason)`` for a sliding window the decode steps cannot follow by eviction;
        ``(None, None)`` without one.
    """
    from attnopt.passes.sliding_window import SlidingWindow

    windows = [p for p in passes if isinstance(p, SlidingWindow)]
    if not windows:
        return None, None
    if len(windows) > 1:
        return None, "the pipeline has several sliding-window passes"
    (window,) = windows
    if window.layers is not None or window.sites is not None or window.heads is not None:
        return None, "it selects some layers, sites or heads (the others need every position)"
    streaming = Streaming(window=window.window, sinks=window.sinks)
    if window.min_len > streaming.capacity:
        return None, f"its min_len={window.min_len} keeps longer caches dense"
    return streaming, None


class _Cache:
    """The decode steps' key/value caches and attention mask in static buffers.

    Growing: one buffer of ``capacity`` positions per cache, views extended in place by each
    step's ``kv_append``. Streaming: ``capacity`` is the streaming one; once a step fills the
    buffers, the oldest non-sink position's slot takes the newest entry (one position copied per
    cache) and the views shrink back by one: order inside the cache does not matter to attention
    with one query per row, and the mask slots move with their keys.
    """

    def __init__(
        self,
        kv: tuple[torch.Tensor, ...],
        mask: torch.Tensor,
        capacity: int,
        streaming: Streaming | None,
    ):
        length = mask.shape[1]
        keep = None
        if streaming is not None and length > streaming.capacity - 1:
            # The prompt's sinks and its most recent window: what the next query may see.
            keep = torch.cat(
                [
                    torch.arange(streaming.sinks, device=mask.device),
                    torch.arange(length - streaming.window, length, device=mask.device),
                ]
            )
            kv = tuple(t.index_select(2, keep) for t in kv)
            mask = mask.index_select(1, keep)
            length = keep.numel()
        self.streaming = streaming
        self.capacity = capacity
        self.buffers = [static_cache(t, capacity) for t in kv]  # held while views are used
        self.views = [buffer[:, :, :length] for buffer in self.buffers]
        self.mask = mask.new_zeros(mask.shape[0], capacity)
        self.mask[:, :length] = mask
        self.length = length
        first = streaming.sinks if streaming is not None else 0
        self._oldest = deque(range(first, capacity - 1))

    def step_mask(self) -> torch.Tensor:
        """The mask of a step: the cached positions and the new token's."""
        self.mask[:, self.length] = 1
        return self.mask[:, : self.length + 1]

    def advance(self, views: Any) -> None:
        """Take the step's grown views; evict one position when streaming filled the buffers."""
        self.views = list(views)
        self.length += 1
        if self.streaming is None or self.length < self.capacity:
            return
        slot, newest = self._oldest.popleft(), self.capacity - 1
        for view in self.views:
            view[:, :, slot] = view[:, :, newest]
        self.mask[:, slot] = self.mask[:, newest]
        self._oldest.append(slot)
        self.length -= 1
        self.views = [view[:, :, : self.length] for view in self.views]


class Generator:
    """Generates tokens with compiled prefill and decode programs of a causal LM.

    Args:
        model: a transformers decoder-only causal LM, in eval mode.
        compile_step: compiles a step module with a pipeline (see :data:`StepCompiler`).
    """

    def __init__(
        self, model: nn.Module, compile_step: StepCompiler, streaming: Streaming | None = None
    ):
        _check_model(model)
        self.model = model
        self.streaming = streaming
        self._compile_step = compile_step
        self.prefill: Any = None
        self.decode: Any = None
        self.stats = GenerationStats()

    # -- options ---------------------------------------------------------------------------
    def _config(self, options: dict[str, Any]) -> Any:
        base = options.pop("generation_config", None)
        config = copy.deepcopy(self.model.generation_config if base is None else base)
        try:
            unused = config.update(**options)
            config.validate()
        except ValueError as err:
            raise GenerationError(f"invalid generation options: {err}") from err
        if unused:
            raise GenerationError(
                f"generate() does not take {sorted(unused)}: pass input_ids, attention_mask, "
                "generator, max_cache_len, a generation_config and GenerationConfig options "
                "(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, ...)"
            )
        for option, default in _UNSUPPORTED.items():
            value = getattr(config, option, default)
            if value not in (default, None):
                raise GenerationError(
                    f"generate() with {option}={value!r} is not implemented by attnopt (greedy "
                    f"and sampling with one sequence per prompt are): leave {option} at "
                    f"{default!r}, or call the original model's generate()"
                )
        return config

    def _processors(self, config: Any, prompt_length: int, device: torch.device) -> Any:
        """transformers' own logits processors for these options (same semantics as
        ``model.generate``)."""
        try:
            return self.model._get_logits_processor(  # noqa: SLF001 - transformers' own rules
                generation_config=config,
                input_ids_seq_length=prompt_length,
                encoder_input_ids=None,
                prefix_allowed_tokens_fn=None,
                logits_processor=None,
                device=device,
                model_kwargs={},
            )
        except (AttributeError, TypeError) as err:  # pragma: no cover - other transformers
            raise GenerationError(
                f"this transformers version's logits processors could not be built ({err}); "
                "attnopt's generate() is tested with transformers 5"
            ) from err

    # -- compiled steps --------------------------------------------------------------------
    def _steps(self, device: torch.device) -> tuple[Any, Any]:
        """The compiled prefill and decode modules, compiled on first use.

        Both are compiled for a synthetic example (batch 2, one row left-padded, 16 prompt
        positions), not for the first request: the programs are symbolic in batch and length, and
        an example of batch 1 would let sizes of one leak into their shapes.
        """
        if self.prefill is None:
            prefill = self._compile_step(PrefillStep(self.model), None)
            decode = self._compile_step(DecodeStep(self.model), DECODE_PIPELINE)
            batch, length = 2, 16
            vocab = int(getattr(self.model.config, "vocab_size", 2) or 2)
            ids = torch.arange(batch * length, device=device).reshape(batch, length) % vocab
            mask = torch.ones_like(ids)
            mask[1, :3] = 0
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            with torch.no_grad():
                _, kv = prefill(ids, mask, positions)
                step_mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
                decode(ids[:, -1:], step_mask, positions[:, -1:] + 1, list(kv))
            self.prefill, self.decode = prefill, decode
        return self.prefill, self.decode

    # -- the loop --------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        max_cache_len: int | None = None,
        record_steps: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """Generate tokens after each prompt; see ``CompiledModule.generate``."""
        import time

        for keyword in ("past_key_values", "cache", "use_cache", "cache_implementation"):
            if keyword in options and options[keyword] not in (None, True, "dynamic", "static"):
                raise GenerationError(
                    f"generate() manages its own static cache: do not pass {keyword}= (attnopt "
                    "allocates prompt + max_new_tokens positions; set max_cache_len to bound it)"
                )
            options.pop(keyword, None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise GenerationError("input_ids must be a [batch, length] tensor of token ids")
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] == 0:
            raise GenerationError(
                f"input_ids must be a non-empty integer tensor, not {input_ids.dtype} "
                f"{list(input_ids.shape)}"
            )
        config = self._config(options)
        batch, prompt = input_ids.shape
        device = input_ids.device
        eos = config.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = config.pad_token_id
        if pad is None and eos_ids:
            pad = eos_ids[0]
        if attention_mask is None:
            if pad is not None and pad not in eos_ids and bool((input_ids == pad).any()):
                attention_mask = (input_ids != pad).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(
                f"attention_mask {list(attention_mask.shape)} must have input_ids' shape "
                f"{list(input_ids.shape)}"
            )
        new = config.max_new_tokens
        if new is None:
            new = config.max_length - prompt
        if new < 1:
            raise GenerationError(
                f"nothing to generate: max_new_tokens={config.max_new_tokens}, max_length="
                f"{config.max_length} for a prompt of {prompt} tokens; set max_new_tokens >= 1"
            )
        total = capacity = prompt + new
        if self.streaming is not None:
            capacity = min(capacity, self.streaming.capacity)
        if max_cache_len is not None and capacity > max_cache_len:
            raise GenerationError(
                f"the prompt ({prompt} tokens) plus max_new_tokens={new} needs {capacity} cache "
                f"positions, past max_cache_len={max_cache_len}: raise max_cache_len or lower "
                "max_new_tokens"
            )
        limit = _absolute_position_limit(self.model)
        if limit is not None and total > limit:
            raise GenerationError(
                f"{type(self.model).__name__} has {limit} learned positions; the prompt "
                f"({prompt} tokens) plus max_new_tokens={new} needs {total}: lower "
                "max_new_tokens or shorten the prompt"
            )
        self._check_windows(total)
        processors = self._processors(config, prompt, device)

        compile_before = 0.0
        if self.prefill is not None:
            compile_before = _compile_seconds(self.prefill) + _compile_seconds(self.decode)
        prefill, decode = self._steps(device)
        stats = GenerationStats(prompt_tokens=prompt, cache_capacity=capacity)
        if record_steps:
            stats.token_seconds = []
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        start = time.perf_counter()
        with torch.no_grad():
            logits, kv = prefill(input_ids, mask, positions)
            cache = _Cache(kv, mask, capacity, self.streaming)
        stats.prefill_seconds = time.perf_counter() - start
        tokens = input_ids
        unfinished = torch.ones(batch, dtype=torch.long, device=device)
        eos_tensor = torch.tensor(eos_ids, device=device) if eos_ids else None
        position = positions[:, -1:]
        start = time.perf_counter()
        with torch.no_grad():
            for step in range(new):
                scores = processors(tokens, logits.to(torch.float32))
                if config.do_sample:
                    probs = torch.softmax(scores, dim=-1)
                    chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    chosen = torch.argmax(scores, dim=-1)
                if eos_tensor is not None:
                    chosen = chosen * unfinished + pad * (1 - unfinished)
                tokens = torch.cat([tokens, chosen[:, None]], dim=-1)
                stats.new_tokens = step + 1
                if eos_tensor is not None:
                    unfinished = unfinished & ~torch.isin(chosen, eos_tensor)
                    if not bool(unfinished.any()):
                        break
                if step == new - 1:
                    break
                position = position + 1
                logits, views = decode(chosen[:, None], cache.step_mask(), position, cache.views)
                cache.advance(views)
                if stats.token_seconds is not None:
                    stats.token_seconds.append(time.perf_counter() - start)
        stats.decode_seconds = time.perf_counter() - start
        stats.compile_seconds = _compile_seconds(prefill) + _compile_seconds(decode)
        stats.compile_seconds -= compile_before
        self.stats = stats
        return tokens

    def _check_windows(self, capacity: int) -> None:
        """Refuse lengths past a model's own sliding window (its cache then drops positions,
        which the static cache does not do yet)."""
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or []
        windowed = any("sliding" in str(t) for t in layer_types) or (
            window is not None and not layer_types
        )
        if window and windowed and capacity > int(window):
            raise GenerationError(
                f"{type(self.model).__name__} attends within a sliding window of {window} "
                f"positions and the prompt plus max_new_tokens needs {capacity}: attnopt's "
                "static cache keeps every position, which differs from the model past the "
                "window; lower max_new_tokens (or the prompt) to stay within it"
            )


def _compile_seconds(module: Any) -> float:
    stats = getattr(module, "stats", None) or {}
    return float(sum(stats.get("compile_seconds", ())))
