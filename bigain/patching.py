"""Attach a compressor to a diffusers denoiser by wrapping its installed attention processors.

``bigain.apply(model, compressor)`` finds the self-attention layers (``attn1`` of every
``BasicTransformerBlock``) of a ``UNet2DConditionModel`` or a ``DiTTransformer2DModel`` (or of the
one a pipeline holds), keeps those the selection asks for, and replaces each layer's processor by a
:class:`CompressingProcessor` that holds the original. At every call the wrapper builds a
:class:`~bigain.compressor.LayerContext`, asks the compressor for ``(queries, context, restore)``,
calls the *original* processor with ``queries`` as hidden states and ``context`` as the tensor keys
and values come from, and restores the output to the full token count. No attention maths is
copied and no class is swapped, so SDPA, xformers, LoRA and IP-Adapter processors keep working.

Two forward pre-hooks feed the contexts: one on the denoiser (input size and timesteps, read from
keyword or positional arguments) and one on each selected transformer block (its input, the UNet
metric). :meth:`CompressionHandle.remove` puts back exactly the processor objects that were there.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bigain.compressor import LayerContext, TokenCompressor
from bigain.errors import ConfigError, UnsupportedModelError
from bigain.registry import create_compressor

__all__ = ["apply", "CompressionHandle", "CompressingProcessor", "LayerStats", "find_denoiser",
           "PAPER_DIT_BLOCKS", "default_dit_blocks"]

#: The DiT-XL/2 blocks the paper compresses (``block_tome_flags``): 1-5 and 7-11 of 28.
PAPER_DIT_BLOCKS: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 8, 9, 10, 11)
_PAPER_DIT_DEPTH = 28


def default_dit_blocks(depth: int) -> list[int]:
    """The paper's DiT block selection scaled to a model of ``depth`` blocks.

    Block ``i`` is selected when block ``floor(i * 28 / depth)`` of DiT-XL/2 is: exactly the paper's
    blocks for depth 28, never the first block, and about the first 40% of any deeper or shallower
    model (for example blocks 1-2 of 6, 1-5 of 12).
    """
    return [i for i in range(depth) if (i * _PAPER_DIT_DEPTH) // depth in PAPER_DIT_BLOCKS]


def find_denoiser(obj: Any) -> tuple[nn.Module, str]:
    """The denoiser to compress and its family (``"unet"`` or ``"dit"``).

    Accepts a ``UNet2DConditionModel``, a ``DiTTransformer2DModel``, or any object (a diffusers
    pipeline, a bigain backbone) whose ``denoiser``, ``unet`` or ``transformer`` attribute is one.
    """
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    if isinstance(obj, UNet2DConditionModel):
        return obj, "unet"
    if isinstance(obj, DiTTransformer2DModel):
        return obj, "dit"
    for attr in ("denoiser", "unet", "transformer"):
        inner = getattr(obj, attr, None)
        if isinstance(inner, (UNet2DConditionModel, DiTTransformer2DModel)):
            return find_denoiser(inner)
    raise UnsupportedModelError(
        f"bigain.apply cannot compress a {type(obj).__module__}.{type(obj).__qualname__}: it supports "
        f"diffusers UNet2DConditionModel (Stable Diffusion 1.x/2.x/XL UNets), DiTTransformer2DModel, "
        f"and pipelines or backbones holding one of them as .unet / .transformer / .denoiser"
    )


@dataclass
class LayerStats:
    """Measured token counts of one compressed layer (per sample, averaged over its calls)."""

    layer: str
    level: int
    grid: tuple[int, int] | None = None
    calls: int = 0
    compressed_calls: int = 0
    tokens_in: float = 0.0
    queries: float = 0.0
    keys_values: float = 0.0
    skipped: str | None = None  # reason the last call was not compressed, if it was not

    def _record(self, n: int, nq: int, nk: int) -> None:
        self.calls += 1
        k = self.calls
        self.tokens_in += (n - self.tokens_in) / k
        self.queries += (nq - self.queries) / k
        self.keys_values += (nk - self.keys_values) / k

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "level": self.level,
            "grid": list(self.grid) if self.grid else None, "calls": self.calls,
            "compressed_calls": self.compressed_calls, "tokens_in": self.tokens_in,
            "queries": self.queries, "keys_values": self.keys_values, "skipped": self.skipped,
        }


@dataclass
class _Layer:
    name: str
    index: int
    level: int
    block: nn.Module
    attn: nn.Module
    stats: LayerStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = LayerStats(self.name, self.level)


class _State:
    """What the pre-hooks capture for the processors of one denoiser call."""

    def __init__(self, family: str, patch_size: int, seed: int, num_train_timesteps: int,
                 metric: str) -> None:
        self.family = family
        self.patch_size = patch_size
        self.seed = seed
        self.num_train_timesteps = num_train_timesteps
        self.metric = metric
        self.size: tuple[int, int] | None = None
        self.timesteps: Tensor | None = None
        self.timestep_values: tuple[float, ...] | None = None  # host copy, read once per call
        self.block_inputs: dict[int, Tensor] = {}
        self.enabled = True


class CompressingProcessor(nn.Module):
    """Wraps one installed attention processor; see the module docstring.

    ``inspect.signature(wrapper.__call__)`` is the inner processor's, so diffusers keeps passing
    the same ``cross_attention_kwargs`` (LoRA ``scale``, IP-Adapter inputs) it passed before.
    Attributes it does not have are looked up on the inner processor.
    """

    def __init__(self, inner: Any, layer: _Layer, compressor: TokenCompressor, state: _State) -> None:
        super().__init__()
        self.inner = inner  # registered as a submodule when it is one (LoRA / IP-Adapter weights)
        self.__dict__["_layer"] = layer
        self.__dict__["_compressor"] = compressor
        self.__dict__["_state"] = state

        def __call__(*args: Any, **kwargs: Any) -> Any:
            return nn.Module.__call__(self, *args, **kwargs)

        __call__.__signature__ = inspect.signature(inner.__call__)
        self.__dict__["__call__"] = __call__

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("inner", "_modules", "_parameters", "_buffers"):
                raise
            inner = self._modules.get("inner", self.__dict__.get("inner"))
            return getattr(inner, name)

    def extra_repr(self) -> str:
        return f"layer={self._layer.name!r}, compressor={self._compressor!r}"

    def _grid(self, n: int) -> tuple[int, int] | None:
        state = self._state
        if state.size is None:
            return None
        height, width = state.size
        if state.family == "dit":
            return (height, width) if height * width == n else None
        level = self._layer.level
        for d in [level] + [2**k for k in range(8) if 2**k != level]:
            h, w = math.ceil(height / d), math.ceil(width / d)
            if h * w == n:
                return h, w
        return None

    def _timesteps(self, batch: int, device: torch.device) -> tuple[Tensor, tuple[float, ...]] | None:
        """The ``[B]`` float32 timesteps on ``device`` and the same values on the host."""
        state = self._state
        t = state.timesteps
        if t is None:
            return None
        t = t.to(dtype=torch.float32).reshape(-1)
        if state.timestep_values is None:
            state.timestep_values = tuple(t.tolist())  # one device read per denoiser call
        values = state.timestep_values
        t = t.to(device=device)
        if t.numel() == 1:
            return t.expand(batch), values * batch
        if t.numel() == batch:
            return t, values
        if batch % t.numel() == 0:
            return t.repeat(batch // t.numel()), values * (batch // t.numel())
        return None

    def forward(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer, state, stats = self._layer, self._state, self._layer.stats
        n = hidden_states.shape[1] if hidden_states.ndim == 3 else -1
        reason = None
        if not state.enabled:
            reason = "disabled"
        elif args or hidden_states.ndim != 3:
            reason = "unexpected call signature"
        elif kwargs.get("encoder_hidden_states") is not None:
            reason = "called as cross-attention"
        elif kwargs.get("attention_mask") is not None:
            reason = "attention mask given"
        grid = timesteps = None
        if reason is None:
            grid = self._grid(n)
            timesteps = self._timesteps(hidden_states.shape[0], hidden_states.device)
            if grid is None:
                reason = f"token grid of {n} tokens unknown (input size {state.size})"
            elif timesteps is None:
                reason = "timesteps unknown or not one per sample"
        if reason is None:
            metric = hidden_states
            if state.metric == "block":
                block_input = state.block_inputs.get(layer.index)
                if block_input is not None and block_input.shape == hidden_states.shape:
                    metric = block_input
            ctx = LayerContext(name=layer.name, grid=grid, level=layer.level, timesteps=timesteps[0],
                               metric=metric, seed=state.seed, layer_index=layer.index,
                               num_train_timesteps=state.num_train_timesteps, timestep_values=timesteps[1])
            if not self._compressor.applies_to(ctx):
                reason = "compressor does not apply to this layer/grid"
        stats.grid = grid
        if reason is not None:
            stats.skipped = reason
            stats._record(max(n, 0), max(n, 0), max(n, 0))
            return self.inner(attn, hidden_states, *args, **kwargs)

        out = self._compressor.compress(hidden_states, ctx)
        stats.skipped = None
        stats._record(n, out.queries.shape[1], out.context.shape[1])
        if out.is_identity:
            return self.inner(attn, hidden_states, *args, **kwargs)
        stats.compressed_calls += 1
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = None if out.context is out.queries else out.context
        return out.restore(self.inner(attn, out.queries, **kwargs))


class CompressionHandle:
    """What :func:`apply` returns: undo, inspect, and re-seed an applied compressor.

    Use it as a context manager to remove the compressor on exit.
    """

    def __init__(self, denoiser: nn.Module, family: str, compressor: TokenCompressor,
                 layers: list[_Layer], skipped: list[tuple[str, str]], state: _State) -> None:
        self.denoiser = denoiser
        self.family = family
        self.compressor = compressor
        self.skipped: list[tuple[str, str]] = skipped
        self._layers = layers
        self._state = state
        self._originals: dict[int, Any] = {}
        self._wrappers: dict[int, CompressingProcessor] = {}
        self._hooks: list[Any] = []
        self.removed = False

    @property
    def layers(self) -> list[str]:
        """Names of the attention layers the compressor is attached to."""
        return [layer.name for layer in self._layers]

    @property
    def seed(self) -> int:
        """The seed every :class:`LayerContext` derives its randomness from."""
        return self._state.seed

    @property
    def enabled(self) -> bool:
        """While False, every wrapped layer calls its original processor unchanged (still counted)."""
        return self._state.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._state.enabled = bool(value)

    def set_seed(self, seed: int) -> None:
        """Change the seed every :class:`LayerContext` derives its randomness from."""
        self._state.seed = int(seed)

    def stats(self) -> list[dict[str, Any]]:
        """Measured per-layer token counts (per sample, mean over calls since the last reset)."""
        return [layer.stats.as_dict() for layer in self._layers]

    def reset_stats(self) -> None:
        """Forget the token counts measured so far (for example between a warm-up and a measurement)."""
        for layer in self._layers:
            layer.stats = LayerStats(layer.name, layer.level)

    def tokens_kept(self) -> dict[int, dict[str, float]]:
        """Per level, the measured fraction of queries and of keys/values kept (mean over layers)."""
        out: dict[int, dict[str, list[float]]] = {}
        for layer in self._layers:
            s = layer.stats
            if s.calls and s.tokens_in:
                row = out.setdefault(s.level, {"queries": [], "keys_values": []})
                row["queries"].append(s.queries / s.tokens_in)
                row["keys_values"].append(s.keys_values / s.tokens_in)
        return {lvl: {k: sum(v) / len(v) for k, v in row.items()} for lvl, row in sorted(out.items())}

    def remove(self) -> None:
        """Put back exactly the processor objects that were installed before :func:`apply`.

        A layer whose processor was replaced by someone else in the meantime is left alone.
        """
        if self.removed:
            return
        for hook in self._hooks:
            hook.remove()
        for layer in self._layers:
            wrapper = self._wrappers.get(layer.index)
            if wrapper is not None and layer.attn.processor is wrapper:
                layer.attn.set_processor(self._originals[layer.index])
        self._state.block_inputs.clear()
        self._state.timesteps = None
        self._state.timestep_values = None
        self.removed = True

    def __enter__(self) -> CompressionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._layers)} layers"
        return f"CompressionHandle({self.compressor!r} on {type(self.denoiser).__name__}, {state})"


def _unet_levels(unet: nn.Module) -> dict[str, int]:
    """Downsample level of every transformer block of a UNet, from its structure."""
    levels: dict[str, int] = {}
    level = 1
    for i, block in enumerate(unet.down_blocks):
        for name, mod in block.named_modules():
            if type(mod).__name__ == "BasicTransformerBlock":
                levels[f"down_blocks.{i}.{name}"] = level
        if getattr(block, "downsamplers", None):
            level *= 2
    if getattr(unet, "mid_block", None) is not None:
        for name, mod in unet.mid_block.named_modules():
            if type(mod).__name__ == "BasicTransformerBlock":
                levels[f"mid_block.{name}"] = level
    for i, block in enumerate(unet.up_blocks):
        for name, mod in block.named_modules():
            if type(mod).__name__ == "BasicTransformerBlock":
                levels[f"up_blocks.{i}.{name}"] = level
        if getattr(block, "upsamplers", None):
            level //= 2
    return levels


def _first(args: tuple, kwargs: dict, position: int, names: Sequence[str]) -> Any:
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[position] if len(args) > position else None


def _num_train_timesteps(model: Any) -> int:
    """The training schedule length of a pipeline's or backbone's scheduler (default 1000)."""
    config = getattr(getattr(model, "scheduler", None), "config", None)
    value = getattr(config, "num_train_timesteps", None) or getattr(model, "num_train_timesteps", None)
    return int(value) if value else 1000


def apply(
    model: Any,
    compressor: TokenCompressor | str | type = "none",
    *,
    max_downsample: int = 1,
    blocks: Sequence[int] | Literal["paper", "all"] = "paper",
    metric: Literal["auto", "block", "attention"] = "auto",
    seed: int = 0,
    **compressor_kwargs: Any,
) -> CompressionHandle:
    """Attach ``compressor`` to the self-attention layers of a diffusers denoiser.

    Args:
        model: a ``UNet2DConditionModel``, a ``DiTTransformer2DModel``, or a pipeline/backbone
            holding one (``.unet``, ``.transformer`` or ``.denoiser``).
        compressor: a :class:`TokenCompressor` instance, class, or registered name.
        max_downsample: UNet only: compress the levels whose downsample factor is at most this
            (1 = the full-resolution level only, as in ToMe-SD; 2, 4, 8 add deeper levels).
        blocks: DiT only: block indices to compress; ``"paper"`` (default) is the paper's blocks 1-5
            and 7-11 of 28, scaled to the model's depth (:func:`default_dit_blocks`); ``"all"``.
        metric: the tokens compressors score and match on: ``"block"`` (the transformer block's
            input), ``"attention"`` (the attention input), or ``"auto"`` - block for a UNet (as
            ToMe-SD does), attention for a DiT (as the BiGain DiT code does).
        seed: seed of all the compressor's randomness (never the global RNG).
        **compressor_kwargs: hyperparameters, when ``compressor`` is a name or class.

    Returns:
        A :class:`CompressionHandle`; ``handle.remove()`` undoes everything.
    """
    comp = create_compressor(compressor, **compressor_kwargs)
    denoiser, family = find_denoiser(model)
    if not isinstance(max_downsample, int) or max_downsample < 1:
        raise ConfigError(f"max_downsample must be an integer >= 1 (1, 2, 4, 8), got {max_downsample!r}")
    if metric not in ("auto", "block", "attention"):
        raise ConfigError(f"metric must be 'auto', 'block' or 'attention', got {metric!r}")
    for mod in denoiser.modules():
        if isinstance(getattr(mod, "processor", None), CompressingProcessor):
            raise ConfigError(
                f"this {type(denoiser).__name__} already has a bigain compressor applied "
                f"({mod.processor._compressor!r}); call remove() on its handle before applying another"
            )

    layers: list[_Layer] = []
    skipped: list[tuple[str, str]] = []
    if family == "unet":
        if not isinstance(blocks, str) or blocks != "paper":
            raise ConfigError("blocks= selects DiT blocks; for a UNet select levels with max_downsample=")
        levels = _unet_levels(denoiser)
        candidates = [(name, levels.get(name, 1)) for name, mod in denoiser.named_modules()
                      if type(mod).__name__ == "BasicTransformerBlock"]
        selected = []
        for name, level in candidates:
            if level > max_downsample:
                skipped.append((f"{name}.attn1", f"level {level} > max_downsample={max_downsample}"))
            else:
                selected.append((name, level))
        patch_size = 1
    else:
        depth = len(denoiser.transformer_blocks)
        if blocks == "paper":
            chosen = default_dit_blocks(depth)
        elif blocks == "all":
            chosen = list(range(depth))
        else:
            chosen = sorted({int(b) for b in blocks})
            bad = [b for b in chosen if not 0 <= b < depth]
            if bad:
                raise ConfigError(f"blocks {bad} do not exist: this DiT has blocks 0..{depth - 1}")
        candidates = [(f"transformer_blocks.{i}", 1) for i in range(depth)]
        selected = [(f"transformer_blocks.{i}", 1) for i in chosen]
        skipped += [(f"transformer_blocks.{i}.attn1", "block not selected") for i in range(depth) if i not in chosen]
        patch_size = int(denoiser.config.patch_size)

    modules = dict(denoiser.named_modules())
    for name, level in selected:
        block = modules[name]
        attn = getattr(block, "attn1", None)
        if attn is None or getattr(block, "only_cross_attention", False) or getattr(attn, "is_cross_attention", False):
            skipped.append((f"{name}.attn1", "not a self-attention layer"))
            continue
        layers.append(_Layer(f"{name}.attn1", len(layers), level, block, attn))

    state = _State(family, patch_size, int(seed), _num_train_timesteps(model),
                   ("block" if family == "unet" else "attention") if metric == "auto" else metric)
    handle = CompressionHandle(denoiser, family, comp, layers, skipped, state)

    def denoiser_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = _first(args, kwargs, 0, ("sample", "hidden_states"))
        if isinstance(sample, Tensor) and sample.ndim == 4:
            h, w = sample.shape[-2:]
            state.size = (h // state.patch_size, w // state.patch_size)
        t = _first(args, kwargs, 1, ("timestep", "timesteps"))
        state.timesteps = torch.as_tensor(t) if t is not None else None
        state.timestep_values = None
        state.block_inputs.clear()

    handle._hooks.append(denoiser.register_forward_pre_hook(denoiser_hook, with_kwargs=True))
    if state.metric == "block":
        for layer in layers:
            def block_hook(module: nn.Module, args: tuple, kwargs: dict, _i: int = layer.index) -> None:
                x = _first(args, kwargs, 0, ("hidden_states",))
                if isinstance(x, Tensor):
                    state.block_inputs[_i] = x
            handle._hooks.append(layer.block.register_forward_pre_hook(block_hook, with_kwargs=True))

    for layer in layers:
        original = layer.attn.processor
        wrapper = CompressingProcessor(original, layer, comp, state)
        handle._originals[layer.index] = original
        handle._wrappers[layer.index] = wrapper
        layer.attn.set_processor(wrapper)
    return handle
