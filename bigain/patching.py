"""Attach a compressor to a diffusers denoiser by wrapping its installed attention processors.

``bigain.apply(model, compressor)`` asks the model family's :class:`~bigain.adapters.DenoiserAdapter`
for the self-attention layers and their levels, keeps those the selection asks for, and replaces
each layer's processor by a :class:`CompressingProcessor` that holds the original. At every call the
wrapper builds a :class:`~bigain.compressor.LayerContext`, asks the compressor for
``(queries, context, restore)``, calls the *original* processor with ``queries`` as hidden states
and ``context`` as the tensor keys and values come from, and restores the output to the full token
count. No attention maths is copied and no class is swapped, so SDPA, xformers, LoRA and IP-Adapter
processors keep working.

Forward pre-hooks feed the contexts: one on the denoiser (the call's input size and timesteps) and,
for the ``"block"`` metric, one on each selected transformer block (its input).

Joint attention (SD3, Flux; :attr:`~bigain.adapters.AttentionSite.text`) carries text tokens beside
the image tokens. Only the image tokens reach the compressor; the text tokens are handed to the
processor as they came, so they attend to the compressed image tokens and are attended to by them,
and their outputs keep their count. Keys and values of a key/value method reach a joint processor
through pre-hooks on ``attn.to_k`` / ``attn.to_v`` that swap in the compressed context for that one
call. For rotary families (Flux) the processor gets ``image_rotary_emb=None`` for a compressed call
and forward hooks on ``attn.norm_q`` / ``norm_k`` (``norm_added_q`` / ``norm_added_k`` for the text)
rotate queries and keys by the positions the compressor gave them, with the adapter's formula.

A compressed forward traces as one ``torch.compile`` graph and never reads a tensor back to the
host: timesteps stay tensors, grids and token counts come from shapes, randomness is a keyed hash
(:mod:`bigain.keyed_random`), and per-call token counting happens only in eager mode (a compiled
graph records the counts it was traced with instead; see :meth:`CompressionHandle.stats`).
:meth:`CompressionHandle.remove` puts back exactly the processor objects that were there.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bigain.adapters import AttentionSite, DenoiserAdapter, find_adapter
from bigain.adapters.dit import PAPER_DIT_BLOCKS, default_dit_blocks
from bigain.compressor import Compressed, LayerContext, TokenCompressor
from bigain.errors import BigainError, CompressorError, ConfigError
from bigain.registry import create_compressor

__all__ = ["apply", "CompressionHandle", "CompressingProcessor", "LayerStats", "find_denoiser",
           "PAPER_DIT_BLOCKS", "default_dit_blocks"]


def find_denoiser(obj: Any) -> tuple[nn.Module, str]:
    """The denoiser to compress and its family name (``"unet"``, ``"dit"``, or a plugin family).

    Accepts a denoiser, or any object (a diffusers pipeline, a bigain backbone) whose ``denoiser``,
    ``unet`` or ``transformer`` attribute is one; see :func:`bigain.adapters.find_adapter`.
    """
    adapter = find_adapter(obj)
    return adapter.denoiser, adapter.family


@dataclass
class LayerStats:
    """Measured token counts of one compressed layer (per sample, averaged over its calls).

    Calls are counted in eager mode. Inside a ``torch.compile`` graph nothing is counted per call
    (counting would cost a recompile or a device sync); ``traced`` then holds the token counts the
    graph was traced with, which are the same at every call since shapes are static.
    """

    layer: str
    level: int
    grid: tuple[int, int] | None = None
    calls: int = 0
    compressed_calls: int = 0
    tokens_in: float = 0.0
    queries: float = 0.0
    keys_values: float = 0.0
    skipped: str | None = None  # reason the last call was not compressed, if it was not
    traced: dict[str, Any] | None = None
    text_tokens: float = 0.0  # text tokens beside the image tokens of a joint-attention call (never compressed)

    def _record(self, n: int, nq: int, nk: int, text: int = 0) -> None:
        self.calls += 1
        k = self.calls
        self.tokens_in += (n - self.tokens_in) / k
        self.queries += (nq - self.queries) / k
        self.keys_values += (nk - self.keys_values) / k
        self.text_tokens += (text - self.text_tokens) / k

    def _reset(self) -> None:
        # in place: a compiled graph holds this object and would recompile for a new one
        self.grid, self.calls, self.compressed_calls, self.skipped, self.traced = None, 0, 0, None, None
        self.tokens_in = self.queries = self.keys_values = self.text_tokens = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "level": self.level,
            "grid": list(self.grid) if self.grid else None, "calls": self.calls,
            "compressed_calls": self.compressed_calls, "tokens_in": self.tokens_in,
            "queries": self.queries, "keys_values": self.keys_values, "text_tokens": self.text_tokens,
            "skipped": self.skipped, "traced": dict(self.traced) if self.traced else None,
        }


@dataclass(eq=False)
class _Layer:
    site: AttentionSite
    index: int
    stats: LayerStats = field(init=False)
    block_input: Tensor | None = None  # the block's input of the current call ("block" metric)
    kv_input: Tensor | None = None  # what attn.to_k / attn.to_v see during a compressed joint call
    rotary: dict[str, tuple[Tensor, Tensor]] | None = None  # rotary tables of a compressed rotary call

    def __post_init__(self) -> None:
        self.stats = LayerStats(self.site.name, self.site.level)

    @property
    def name(self) -> str:
        return self.site.name


class _State:
    """What the denoiser's pre-hook captures for the processors of one denoiser call."""

    def __init__(self, adapter: DenoiserAdapter, seed: int, num_train_timesteps: int, metric: str) -> None:
        self.adapter = adapter
        self.seed = seed
        self.num_train_timesteps = num_train_timesteps
        self.metric = metric
        self.size: tuple[int, int] | None = None
        self.timesteps: Tensor | float | None = None  # as the caller passed them
        self.positions: Tensor | None = None  # image token coordinates of a rotary family
        self.enabled = True


@cache
def _distribution_of(module: str) -> str:
    from importlib import metadata

    top = module.split(".")[0]
    try:
        names = metadata.packages_distributions().get(top)
    except Exception:  # metadata of a broken environment: the message still names the module
        names = None
    return ", ".join(sorted(set(names))) if names else f"module {module} (not an installed distribution)"


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
        self.__dict__["_positional"] = _positional_names(inner)

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

    # -- per call: everything below is static Python on shapes, or tensor ops --------------------
    def _timesteps(self, batch: int, device: torch.device) -> Tensor | None:
        """The ``[B]`` float32 timesteps on ``device`` (never read back to the host)."""
        t = self._state.timesteps
        if t is None:
            return None
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        scale = self._state.adapter.timestep_scale
        if scale != 1.0:
            t = t * scale
        k = t.shape[0]
        if k == 1:
            return t.expand(batch)
        if k == batch:
            return t
        if k and batch % k == 0:
            return t.repeat(batch // k)
        return None

    def _bind(self, args: tuple, kwargs: dict) -> dict | None:
        """The processor's arguments after ``(attn, hidden_states)`` by name (diffusers' Flux attention
        passes them by position); ``None`` when they cannot be named."""
        if not args:
            return kwargs
        names = self._positional
        if len(args) > len(names) or any(name in kwargs for name in names[: len(args)]):
            return None
        return {**dict(zip(names, args)), **kwargs}

    def _context(self, hidden_states: Tensor, call: dict | None) -> tuple[tuple | None, str | None]:
        """``((x, text, ctx, rotary), None)`` for a call to compress, else ``(None, reason)``."""
        layer, state = self._layer, self._state
        site = layer.site
        if not state.enabled:
            return None, "disabled"
        if call is None or hidden_states.ndim != 3:
            return None, "unexpected call signature"
        encoder = call.get("encoder_hidden_states")
        if site.text == "none" and encoder is not None:
            return None, "called as cross-attention"
        if site.text == "encoder" and (not isinstance(encoder, Tensor) or encoder.ndim != 3):
            return None, "joint attention called without text tokens"
        if call.get("attention_mask") is not None:
            return None, "attention mask given"
        size = state.size
        if size is None:
            return None, f"token grid of {hidden_states.shape[1]} tokens unknown (input size unknown)"
        text = None
        if site.text == "prefix":  # [text | image] in one sequence; the image is the level-1 grid
            s = hidden_states.shape[1] - size[0] * size[1]
            if s < 0:
                return None, f"{hidden_states.shape[1]} tokens cannot hold the {size[0]}x{size[1]} image grid"
            text, x = hidden_states[:, :s], hidden_states[:, s:]
        else:
            x = hidden_states
            if site.text == "encoder":
                text, s = encoder, encoder.shape[1]
            else:
                s = 0
        n = x.shape[1]
        grid = state.adapter.grid(site, n, size)
        if grid is None:
            return None, f"token grid of {n} tokens unknown (input size {size})"
        layer.stats.grid = grid
        rotary, positions = None, None
        if site.rotary:
            rotary = call.get("image_rotary_emb")
            if rotary is not None:
                if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2
                        and all(isinstance(t, Tensor) and t.ndim == 2 and t.shape[0] == s + n for t in rotary)):
                    return None, f"rotary embedding is not a (cos, sin) pair of [{s + n}, D] tables"
                pos = state.positions
                if not isinstance(pos, Tensor) or pos.ndim != 2 or pos.shape[0] != n:
                    return None, f"positions of the {n} image tokens unknown"
                positions = pos.to(device=x.device, dtype=torch.float32).expand(x.shape[0], n, pos.shape[1])
        timesteps = self._timesteps(x.shape[0], x.device)
        if timesteps is None:
            return None, "timesteps unknown or not one per sample"
        metric = x
        if state.metric == "block" and layer.block_input is not None and layer.block_input.shape == x.shape:
            metric = layer.block_input
        ctx = LayerContext(name=layer.name, grid=grid, level=site.level, timesteps=timesteps, metric=metric,
                           seed=state.seed, layer_index=layer.index, num_train_timesteps=state.num_train_timesteps,
                           text_tokens=s, positions=positions)
        if not self._compressor.applies_to(ctx):
            return None, "compressor does not apply to this layer/grid"
        return (x, text, ctx, rotary), None

    def _note(self, n: int, nq: int, nk: int, compressed: bool, reason: str | None, text: int = 0) -> None:
        stats = self._layer.stats
        if torch.compiler.is_compiling():
            stats.traced = {"tokens_in": n, "queries": nq, "keys_values": nk, "compressed": compressed,
                            "skipped": reason, "text_tokens": text}
            return
        stats.skipped = reason
        stats._record(n, nq, nk, text)
        if compressed:
            stats.compressed_calls += 1

    def _failure(self, what: str, detail: str) -> CompressorError:
        comp = type(self._compressor)
        return CompressorError(
            f"compressor {self._compressor.name or comp.__name__!r} ({comp.__module__}.{comp.__qualname__}, from "
            f"{_distribution_of(comp.__module__)}) {what} on layer {self._layer.name!r}: {detail}. This is a bug "
            f"in the compressor; run bigain.testing.check_compressor on it, or report it to its authors"
        )

    def _compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        if torch.compiler.is_compiling():
            out = self._compressor.compress(x, ctx)
        else:
            try:
                out = self._compressor.compress(x, ctx)
            except BigainError:
                raise
            except Exception as exc:
                raise self._failure("failed in compress()", f"{type(exc).__name__}: {exc}") from exc
        b, _, c = x.shape
        for label, t in (("queries", out.queries), ("context", out.context)):
            if not isinstance(t, Tensor) or t.ndim != 3 or t.shape[0] != b or t.shape[2] != c:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise self._failure("broke the contract", f"{label} has shape {shape}, expected [{b}, M, {c}]")
        return out

    def _restore(self, out: Compressed, y: Tensor, n: int) -> Tensor:
        if torch.compiler.is_compiling():
            restored = out.restore(y)
        else:
            try:
                restored = out.restore(y)
            except BigainError:
                raise
            except Exception as exc:
                raise self._failure("failed in restore()", f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(restored, Tensor) or restored.shape[:2] != (y.shape[0], n):
            shape = tuple(restored.shape) if isinstance(restored, Tensor) else type(restored).__name__
            raise self._failure("broke the contract", f"restore() gave {shape}, expected [{y.shape[0]}, {n}, ...]")
        return restored

    def forward(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer = self._layer
        layer.kv_input = layer.rotary = None  # never left over from a call that failed
        call = self._bind(args, kwargs)
        prepared, reason = self._context(hidden_states, call)
        layer.block_input = None  # used once; holding it would keep the tensor alive between calls
        if prepared is None:
            n = hidden_states.shape[1] if hidden_states.ndim == 3 else 0
            self._note(n, n, n, False, reason)
            return self.inner(attn, hidden_states, *args, **kwargs)
        x, text, ctx, rotary = prepared
        n = x.shape[1]
        out = self._compress(x, ctx)
        if out.is_identity:
            self._note(n, n, n, False, None, ctx.text_tokens)
            return self.inner(attn, hidden_states, *args, **kwargs)
        self._note(n, out.queries.shape[1], out.context.shape[1], True, None, ctx.text_tokens)
        site = layer.site
        call = dict(call)
        if site.text == "none" and site.kv == "encoder_hidden_states" and not site.rotary:
            call["encoder_hidden_states"] = None if out.context is out.queries else out.context
            return self._restore(out, self.inner(attn, out.queries, **call), n)
        return self._joint(attn, out, text, ctx, rotary, call)

    def _joint(self, attn: nn.Module, out: Compressed, text: Tensor | None, ctx: LayerContext,
               rotary: tuple[Tensor, Tensor] | None, call: dict) -> Any:
        """A compressed call of a joint-attention or rotary site (see the module docstring)."""
        layer, site = self._layer, self._layer.site
        n, s, prefix = ctx.num_tokens, ctx.text_tokens, site.text == "prefix"
        if out.context is not out.queries:
            if site.kv != "projections":
                raise ConfigError(f"layer {layer.name!r}: its adapter passes keys/values as encoder_hidden_states, "
                                  f"which this call uses for other tokens; the adapter must set kv='projections'")
            if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None:
                raise ConfigError(
                    f"layer {layer.name!r} has fused QKV projections (to_qkv), so bigain cannot give its keys and "
                    f"values other tokens than its queries; call the denoiser's unfuse_qkv_projections() before "
                    f"applying {self._compressor.name or type(self._compressor).__name__!r}")
            layer.kv_input = torch.cat([text, out.context], dim=1) if prefix else out.context
        if rotary is not None:
            layer.rotary = self._rotary_tables(out, ctx, rotary)
            call["image_rotary_emb"] = None  # applied by the norm hooks instead
        queries = torch.cat([text, out.queries], dim=1) if prefix else out.queries
        result = self.inner(attn, queries, **call)
        layer.kv_input = layer.rotary = None
        nq = out.queries.shape[1]
        if site.text == "encoder":
            if not isinstance(result, (tuple, list)) or len(result) < 2:
                raise self._failure("got an unexpected result", "a joint-attention processor returned "
                                    f"{type(result).__name__}, expected (image, text) outputs")
            extra = tuple(self._restore(out, r, n) if isinstance(r, Tensor) and r.ndim == 3 and r.shape[1] == nq
                          else r for r in result[2:])  # e.g. an IP-Adapter output, one row per image query
            return (self._restore(out, result[0], n), result[1], *extra)
        if prefix:
            return torch.cat([result[:, :s], self._restore(out, result[:, s:], n)], dim=1)
        return self._restore(out, result, n)

    def _rotary_tables(self, out: Compressed, ctx: LayerContext, rotary: tuple[Tensor, Tensor]
                       ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-sample rotary tables of the compressed queries (``q``), keys (``k``) and text (``added``)."""
        adapter = self._state.adapter
        b, s = ctx.timesteps.shape[0], ctx.text_tokens
        for label, pos, t in (("query_positions", out.query_positions, out.queries),
                              ("context_positions", out.context_positions, out.context)):
            if not isinstance(pos, Tensor) or pos.ndim != 3 or pos.shape[:2] != t.shape[:2]:
                shape = tuple(pos.shape) if isinstance(pos, Tensor) else None
                raise self._failure(
                    "gave no token positions",
                    f"{label} is {shape}, expected [{t.shape[0]}, {t.shape[1]}, {ctx.positions.shape[-1]}]: this "
                    f"family applies rotary position embeddings, so a compressor that changes the tokens must return "
                    f"Compressed(..., query_positions=, context_positions=), computed from ctx.positions with the "
                    f"same token operation as the queries and the context")

        def expand(table: tuple[Tensor, Tensor], rows: slice) -> tuple[Tensor, Tensor]:
            return tuple(t[rows].unsqueeze(0).expand(b, -1, -1) for t in table)

        def table_of(pos: Tensor) -> tuple[Tensor, Tensor]:
            if pos is ctx.positions:  # the tokens' own positions: the table the model computed
                return expand(rotary, slice(s, None))
            return adapter.rotary_table(pos)

        q = table_of(out.query_positions)
        k = q if out.context_positions is out.query_positions else table_of(out.context_positions)
        text = expand(rotary, slice(0, s))
        if self._layer.site.text == "prefix":
            return {"q": tuple(torch.cat([a, c], dim=1) for a, c in zip(text, q)),
                    "k": tuple(torch.cat([a, c], dim=1) for a, c in zip(text, k))}
        return {"q": q, "k": k, "added": text}


def _positional_names(inner: Any) -> tuple[str, ...]:
    """Names of a processor's parameters after ``(attn, hidden_states)`` that may be given by position."""
    try:
        params = list(inspect.signature(inner.__call__).parameters.values())[2:]
    except (TypeError, ValueError):
        return ()
    names = []
    for p in params:
        if p.kind is not p.POSITIONAL_OR_KEYWORD:
            break
        names.append(p.name)
    return tuple(names)


class CompressionHandle:
    """What :func:`apply` returns: undo, inspect, and re-seed an applied compressor.

    Use it as a context manager to remove the compressor on exit. Changing :attr:`enabled` or the
    seed of a compiled denoiser makes ``torch.compile`` recompile it once (both are constants of the
    graph).
    """

    def __init__(self, adapter: DenoiserAdapter, compressor: TokenCompressor,
                 layers: list[_Layer], skipped: list[tuple[str, str]], state: _State) -> None:
        self.adapter = adapter
        self.denoiser = adapter.denoiser
        self.compressor = compressor
        self.skipped: list[tuple[str, str]] = skipped
        self._layers = layers
        self._state = state
        self._originals: dict[int, Any] = {}
        self._wrappers: dict[int, CompressingProcessor] = {}
        self._hooks: list[Any] = []
        self.removed = False

    @property
    def family(self) -> str:
        """The denoiser's family, as its adapter names it (``"unet"``, ``"dit"``, ...)."""
        return self.adapter.family

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
        """Per-layer token counts: per sample, mean over the eager calls since the last reset, and
        under ``traced`` the counts of the last ``torch.compile`` trace (compiled calls are not
        counted one by one)."""
        return [layer.stats.as_dict() for layer in self._layers]

    def reset_stats(self) -> None:
        """Forget the token counts measured so far (for example between a warm-up and a measurement)."""
        for layer in self._layers:
            layer.stats._reset()

    def tokens_kept(self) -> dict[int, dict[str, float]]:
        """Per level, the fraction of queries and of keys/values kept (mean over layers): measured
        over the eager calls, or from the traced counts of a layer that only ran compiled."""
        out: dict[int, dict[str, list[float]]] = {}
        for layer in self._layers:
            s = layer.stats
            if s.calls and s.tokens_in:
                n, nq, nk = s.tokens_in, s.queries, s.keys_values
            elif s.traced and s.traced["tokens_in"]:
                n, nq, nk = s.traced["tokens_in"], s.traced["queries"], s.traced["keys_values"]
            else:
                continue
            row = out.setdefault(s.level, {"queries": [], "keys_values": []})
            row["queries"].append(nq / n)
            row["keys_values"].append(nk / n)
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
            if wrapper is not None and layer.site.attn.processor is wrapper:
                layer.site.attn.set_processor(self._originals[layer.index])
            layer.block_input = layer.kv_input = layer.rotary = None
        self._state.timesteps = None
        self._state.size = None
        self._state.positions = None
        self.removed = True

    def __enter__(self) -> CompressionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._layers)} layers"
        return f"CompressionHandle({self.compressor!r} on {type(self.denoiser).__name__}, {state})"


def _num_train_timesteps(model: Any) -> int:
    """The training schedule length of a pipeline's or backbone's scheduler (default 1000)."""
    config = getattr(getattr(model, "scheduler", None), "config", None)
    value = getattr(config, "num_train_timesteps", None) or getattr(model, "num_train_timesteps", None)
    return int(value) if value else 1000


def _is_self_attention(site: AttentionSite) -> bool:
    attn = site.attn
    return not (attn is None or getattr(site.block, "only_cross_attention", False)
                or getattr(attn, "is_cross_attention", False))


def _joint_hooks(adapter: DenoiserAdapter, layer: _Layer) -> list[Any]:
    """The hooks a joint-attention or rotary site needs: key/value inputs swapped in at ``to_k`` /
    ``to_v``, rotary embeddings applied after ``norm_q`` / ``norm_k`` (and the text's
    ``norm_added_q`` / ``norm_added_k``). Each does nothing unless a compressed call is in flight."""
    site, attn, hooks = layer.site, layer.site.attn, []
    if site.kv == "projections":
        def kv_hook(module: nn.Module, args: tuple) -> tuple | None:
            return None if layer.kv_input is None else (layer.kv_input,)

        for name in ("to_k", "to_v"):
            proj = getattr(attn, name, None)
            if not isinstance(proj, nn.Module):
                raise ConfigError(f"layer {site.name!r} has no attn.{name} module, where bigain passes compressed "
                                  f"keys/values; its adapter ({type(adapter).__name__}) must not set kv='projections'")
            hooks.append(proj.register_forward_pre_hook(kv_hook))
    if site.rotary:
        parts = [("norm_q", "q"), ("norm_k", "k")]
        if site.text == "encoder":
            parts += [("norm_added_q", "added"), ("norm_added_k", "added")]
        for name, part in parts:
            norm = getattr(attn, name, None)
            if not isinstance(norm, nn.Module):
                raise ConfigError(f"layer {site.name!r} has no attn.{name} module, after which bigain applies the "
                                  f"rotary embedding of compressed tokens; its adapter must not set rotary=True")

            def rotary_hook(module: nn.Module, args: tuple, output: Tensor, _part: str = part) -> Tensor | None:
                tables = layer.rotary
                return None if tables is None else adapter.apply_rotary(output, tables[_part])

            hooks.append(norm.register_forward_hook(rotary_hook))
    return hooks


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
        model: a denoiser a registered adapter handles (``UNet2DConditionModel``,
            ``DiTTransformer2DModel``, ...), or a pipeline/backbone holding one (``.unet``,
            ``.transformer`` or ``.denoiser``).
        compressor: a :class:`TokenCompressor` instance, class, or registered name.
        max_downsample: UNet only: compress the levels whose downsample factor is at most this
            (1 = the full-resolution level only, as in ToMe-SD; 2, 4, 8 add deeper levels).
        blocks: DiT only: block indices to compress; ``"paper"`` (default) is the paper's blocks 1-5
            and 7-11 of 28, scaled to the model's depth (:func:`default_dit_blocks`); ``"all"``.
        metric: the tokens compressors score and match on: ``"block"`` (the transformer block's
            input), ``"attention"`` (the attention input), or ``"auto"`` - the family's default
            (block for a UNet, as ToMe-SD does; attention for a DiT, as the BiGain DiT code does).
        seed: seed of all the compressor's randomness (never the global RNG).
        **compressor_kwargs: hyperparameters, when ``compressor`` is a name or class.

    Returns:
        A :class:`CompressionHandle`; ``handle.remove()`` undoes everything.
    """
    comp = create_compressor(compressor, **compressor_kwargs)
    adapter = find_adapter(model)
    denoiser = adapter.denoiser
    if not isinstance(max_downsample, int) or isinstance(max_downsample, bool) or max_downsample < 1:
        raise ConfigError(f"max_downsample must be an integer >= 1 (1, 2, 4, 8), got {max_downsample!r}")
    if metric not in ("auto", "block", "attention"):
        raise ConfigError(f"metric must be 'auto', 'block' or 'attention', got {metric!r}")
    for mod in denoiser.modules():
        if isinstance(getattr(mod, "processor", None), CompressingProcessor):
            raise ConfigError(
                f"this {type(denoiser).__name__} already has a bigain compressor applied "
                f"({mod.processor._compressor!r}); call remove() on its handle before applying another"
            )

    selected, skipped = adapter.select(adapter.sites(), max_downsample=max_downsample, blocks=blocks)
    layers: list[_Layer] = []
    for site in selected:
        if _is_self_attention(site):
            layers.append(_Layer(site, len(layers)))
        else:
            skipped.append((site.name, "not a self-attention layer"))

    if not layers and skipped:
        levels = sorted({site.level for site in adapter.sites()})
        warnings.warn(
            f"bigain.apply selected no self-attention layer of this {type(denoiser).__name__}, so nothing will "
            f"be compressed; its layers sit at levels {levels} (first reason: {skipped[0][1]}). Select some: "
            f"max_downsample= for a UNet (an SDXL UNet has no attention at level 1: use 2), blocks= for a "
            f"transformer", UserWarning, stacklevel=2)

    state = _State(adapter, int(seed), _num_train_timesteps(model),
                   adapter.default_metric if metric == "auto" else metric)
    handle = CompressionHandle(adapter, comp, layers, skipped, state)

    def denoiser_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.size = adapter.token_size(args, kwargs)
        t = adapter.timesteps(args, kwargs)
        state.timesteps = t  # converted in the processors: no tensor op here, so no graph of its own
        if rotary:
            state.positions = adapter.positions(args, kwargs)

    rotary = any(layer.site.rotary for layer in layers)
    handle._hooks.append(denoiser.register_forward_pre_hook(denoiser_hook, with_kwargs=True))
    for layer in layers:
        handle._hooks.extend(_joint_hooks(adapter, layer))
    if state.metric == "block":
        for layer in layers:
            def block_hook(module: nn.Module, args: tuple, kwargs: dict, _layer: _Layer = layer) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                _layer.block_input = x if isinstance(x, Tensor) else None
            handle._hooks.append(layer.site.block.register_forward_pre_hook(block_hook, with_kwargs=True))

    for layer in layers:
        original = layer.site.attn.processor
        wrapper = CompressingProcessor(original, layer, comp, state)
        handle._originals[layer.index] = original
        handle._wrappers[layer.index] = wrapper
        layer.site.attn.set_processor(wrapper)
    return handle
