"""One fixed denoiser forward to look inside: the input and :class:`~bigain.compressor.LayerContext` of
a self-attention layer, captured during a real forward pass.

A :class:`Probe` holds what the analyses need: the model (anything :func:`bigain.apply` accepts), a
zero-argument function running one denoiser forward on fixed inputs (a noised image at one timestep,
one condition), and the clean image to draw maps over. :func:`probe_backbone` builds one from a
:class:`~bigain.backbones.DiffusionBackbone`; :meth:`Probe.for_denoiser` from a bare denoiser and its
inputs (tests, notebooks).

Layers are numbered as :func:`bigain.apply` numbers them when it compresses *every* self-attention
layer (``blocks="all"`` for a DiT, every level of a UNet): for a DiT the layer index is the block index.
Compressors see that index as ``ctx.layer_index``, so the maps show the randomness of a full
application.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bigain.adapters import adapter_class, find_adapter
from bigain.compressor import Compressed, LayerContext, TokenCompressor
from bigain.errors import CheckpointError, ConfigError
from bigain.patching import _is_self_attention, apply, find_denoiser
from bigain.registry import create_compressor, get_compressor

__all__ = ["Probe", "LayerInfo", "CapturedLayer", "MethodSpec", "LayerRecorder", "OnlyLayers",
           "probe_backbone", "load_backbone", "load_image", "toy_image", "all_layers_options",
           "list_layers", "default_layer", "capture_layer", "parse_methods", "DEFAULT_METHODS"]

#: The six built-ins, at the ratio / factor the command line fills in.
DEFAULT_METHODS: tuple[str, ...] = ("none", "tome", "bigain_tm", "sito", "todo", "bigain_td")


@dataclass
class Probe:
    """One denoiser forward on fixed inputs.

    Attributes:
        model: what :func:`bigain.apply` attaches to (a backbone, pipeline or denoiser).
        forward: runs the forward once (under ``torch.no_grad``); its result is ignored.
        image: ``[H, W, 3]`` float array in ``[0, 1]``: the clean image the maps are drawn over.
        timestep: the diffusion timestep of the forward.
        description: one line naming model and input, for figure titles.
    """

    model: Any
    forward: Callable[[], Any]
    image: np.ndarray
    timestep: int
    description: str = ""

    @classmethod
    def for_denoiser(cls, denoiser: Any, inputs: dict[str, Any], *, image: np.ndarray | None = None,
                     timestep: int | None = None, description: str = "") -> Probe:
        """A probe calling ``denoiser(**inputs)``; the image defaults to the input's first 3 channels."""
        sample = inputs.get("hidden_states", inputs.get("sample"))
        if image is None:
            img = sample[0, :3].detach().float().cpu()
            img = (img - img.min()) / (img.max() - img.min() + 1e-8)
            image = img.permute(1, 2, 0).numpy()
            if image.shape[-1] < 3:
                image = np.repeat(image[..., :1], 3, axis=-1)
        t = inputs.get("timestep", timestep)
        t = int(torch.as_tensor(t).reshape(-1)[0]) if timestep is None else int(timestep)

        def forward() -> Any:
            with torch.no_grad():
                return denoiser(**inputs)

        return cls(denoiser, forward, image, t, description or type(denoiser).__name__)

    @property
    def family(self) -> str:
        return find_denoiser(self.model)[1]


@dataclass(frozen=True)
class LayerInfo:
    """A compressible self-attention layer: its index, qualified name, token grid and level."""

    index: int
    name: str
    grid: tuple[int, int] | None
    level: int


@dataclass(frozen=True)
class CapturedLayer:
    """The input ``x`` (``[B, N, C]``) and context one layer's compressor saw in a real forward."""

    layer: LayerInfo
    x: Tensor
    ctx: LayerContext
    num_layers: int


@dataclass(frozen=True)
class MethodSpec:
    """A compressor to analyse: its registered name, options and a display label."""

    name: str
    options: dict[str, Any]
    label: str

    def build(self) -> TokenCompressor:
        return create_compressor(self.name, **self.options)

    @property
    def slug(self) -> str:
        """A file-name-safe form of the label."""
        parts = [self.name] + [f"{k}-{v}" for k, v in self.options.items()]
        text = "_".join(parts)
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def parse_methods(specs: Sequence[str] = DEFAULT_METHODS, *, ratio: float = 0.5, factor: int = 2) -> list[MethodSpec]:
    """Parse ``name[:key=value,...]`` specs; ``ratio`` / ``factor`` fill in methods that take them.

    Unknown names raise the registry's error (with suggestions); bad options its ``ConfigError``.
    """
    from bigain.bench import parse_method

    out = []
    for spec in specs:
        parsed = parse_method(spec)
        if parsed.name == "tomesd":
            raise ConfigError("tomesd is a benchmark baseline, not a compressor to visualise; use tome instead")
        options = dict(parsed.options)
        names = get_compressor(parsed.name).hyperparameter_names()
        if "ratio" in names:
            options.setdefault("ratio", ratio)
        if "factor" in names:
            options.setdefault("factor", factor)
        create_compressor(parsed.name, **options)  # validate the filled-in options
        shown = ", ".join(f"{k}={v}" for k, v in options.items())
        out.append(MethodSpec(parsed.name, options, f"{parsed.name} ({shown})" if shown else parsed.name))
    if not out:
        raise ConfigError("give at least one method, e.g. --methods none tome bigain_tm")
    return out


# -- recording --------------------------------------------------------------------------------

class LayerRecorder(TokenCompressor):
    """Compresses nothing; remembers every layer's grid and the input/context of chosen layers.

    Args:
        layers: layer indices whose ``(x, ctx)`` to keep (``None``: keep none, record grids only).
    """

    name = "record"

    def __init__(self, *, layers: tuple[int, ...] | None = None) -> None:
        self.layers = tuple(layers) if layers is not None else None
        self.grids: dict[int, tuple[int, int]] = {}
        self.captured: dict[int, tuple[Tensor, LayerContext]] = {}

    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        self.grids[ctx.layer_index] = ctx.grid
        if self.layers is not None and ctx.layer_index in self.layers:
            ctx = dataclasses.replace(ctx, metric=ctx.metric.detach().clone(),
                                      timesteps=ctx.timesteps.detach().clone())
            self.captured[ctx.layer_index] = (x.detach().clone(), ctx)
        return Compressed.identity(x)


class OnlyLayers(TokenCompressor):
    """Applies ``inner`` to the given layer indices only (any family: DiT blocks or UNet layers).

    Args:
        inner: the compressor to apply.
        layers: indices of the layers to compress.
    """

    name = "only_layers"

    def __init__(self, *, inner: TokenCompressor | None = None, layers: tuple[int, ...] = ()) -> None:
        if inner is None:
            raise ConfigError("OnlyLayers needs the compressor to apply: OnlyLayers(inner=..., layers=(...))")
        self.inner = inner
        self.layers = tuple(layers)

    def applies_to(self, ctx: LayerContext) -> bool:
        return ctx.layer_index in self.layers and self.inner.applies_to(ctx)

    def compress(self, x: Tensor, ctx: LayerContext) -> Compressed:
        return self.inner.compress(x, ctx)


def all_layers_options(model: Any) -> dict[str, Any]:
    """:func:`bigain.apply` options selecting every self-attention layer of ``model`` (anything
    :func:`bigain.apply` accepts), as its adapter says; a family name (``"unet"``, ``"dit"``, ...)
    asks that family's adapter class."""
    if isinstance(model, str):
        return adapter_class(model)(None).all_layers()
    return find_adapter(model).all_layers()


def _record(probe: Probe, layers: tuple[int, ...] | None, *, seed: int) -> tuple[LayerRecorder, list[dict]]:
    recorder = LayerRecorder(layers=layers)
    with apply(probe.model, recorder, seed=seed, **all_layers_options(probe.model)) as handle:
        probe.forward()
        stats = handle.stats()
    return recorder, stats


def list_layers(probe: Probe, *, seed: int = 0) -> list[LayerInfo]:
    """Every compressible self-attention layer of the probe's denoiser, with its token grid."""
    recorder, stats = _record(probe, None, seed=seed)
    return [LayerInfo(i, s["layer"], recorder.grids.get(i), s["level"]) for i, s in enumerate(stats)]


def default_layer(probe: Probe) -> int:
    """The first layer the default application compresses (the paper's first DiT block, the first
    full-resolution UNet layer), numbered as :func:`list_layers` numbers them; 0 when the default
    compresses none."""
    adapter = find_adapter(probe.model)

    def selected(**options: Any) -> list:
        chosen = adapter.select(adapter.sites(), **{"max_downsample": 1, "blocks": "paper", **options})[0]
        return [site for site in chosen if _is_self_attention(site)]

    sites = selected(**adapter.all_layers())
    chosen = {site.name for site in selected()}
    return next((i for i, s in enumerate(sites) if s.name in chosen), 0)


def _check_layer(layer: int, infos_or_count: int, names: Sequence[str]) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < infos_or_count:
        shown = ", ".join(f"{i}: {n}" for i, n in enumerate(names[:8])) + (", ..." if len(names) > 8 else "")
        raise ConfigError(
            f"layer {layer!r} does not exist: this denoiser has {infos_or_count} compressible self-attention "
            f"layers, so give --layer between 0 and {infos_or_count - 1} ({shown})"
        )


def capture_layer(probe: Probe, layer: int, *, seed: int = 0) -> CapturedLayer:
    """Run the probe's forward once and return what layer ``layer``'s compressor would receive.

    Raises:
        ConfigError: ``layer`` is out of range (the message gives the valid range), or the layer
            was not called in a way a compressor can handle (the message gives the reason).
    """
    recorder, stats = _record(probe, (layer,), seed=seed)
    _check_layer(layer, len(stats), [s["layer"] for s in stats])
    if layer not in recorder.captured:
        reason = stats[layer].get("skipped") or "it was not called"
        raise ConfigError(f"layer {layer} ({stats[layer]['layer']}) cannot be compressed in this forward: "
                          f"{reason}; choose another --layer")
    x, ctx = recorder.captured[layer]
    s = stats[layer]
    info = LayerInfo(layer, s["layer"], ctx.grid, s["level"])
    return CapturedLayer(info, x, ctx, len(stats))


# -- building probes from backbones -------------------------------------------------------------

def load_backbone(*, model: str = "toy", path: str | None = None, dtype: str = "float32",
                  device: str = "cpu") -> Any:
    """The backbone to look inside: a bundled toy model, or a checkpoint of any registered backbone.

    Args:
        model: ``toy`` (default: the bundled toy DiT) or ``toy-unet`` (the bundled toy UNet), or a
            registered backbone name (``dit``, ``stable-diffusion``, ``pixart``, ``sd3``, ...) for
            ``path``; with ``path`` and ``toy``, the family is detected from the folder
            (``transformer/`` -> DiT, ``unet/`` with ``class_prompts.safetensors`` -> toy UNet,
            ``unet/`` -> Stable Diffusion) or the hub id (``DiT`` in the name -> DiT).
        path: a checkpoint folder or hub id.
        dtype: precision the networks run in.
        device: where to run.
    """
    from bigain.backbones import BACKBONES, create_backbone

    if model not in BACKBONES.names():
        raise ConfigError(f"--model must be a registered backbone ({', '.join(BACKBONES.names())}), got {model!r}")
    if path is None:
        if model not in ("toy", "toy-unet"):
            raise ConfigError(f"--model {model} needs --model_path (a checkpoint folder or hub id)")
        backbone = create_backbone(model, dtype=dtype)
    else:
        name = model
        if name == "toy":
            root = Path(path).expanduser()
            if (root / "transformer").is_dir():
                name = "dit"
            elif (root / "unet").is_dir():
                name = "toy-unet" if (root / "class_prompts.safetensors").is_file() else "stable-diffusion"
            elif root.exists():
                raise CheckpointError(f"{root} holds neither transformer/ (a DiT) nor unet/ (Stable Diffusion); "
                                      f"give a diffusers pipeline folder written by save_pretrained, or name its "
                                      f"backbone with --model")
            else:
                name = "dit" if "dit" in path.lower() else "stable-diffusion"
        backbone = create_backbone(name, path=path, dtype=dtype)
    return backbone.to(device)


def toy_image(index: int = 0) -> tuple[Tensor, int, str]:
    """Toy test image ``index``: ``([3, 32, 32] in [-1, 1], label, prompt)``."""
    from bigain.toy.data import ToyShapes

    if not isinstance(index, int) or index < 0:
        raise ConfigError(f"--index must be a toy test image index >= 0, got {index!r}")
    item = ToyShapes("test", length=index + 1)[index]
    return item["image"], int(item["label"]), item["prompt"]


def load_image(path: str | Path) -> Tensor:
    """An image file as ``[3, H, W]`` in ``[-1, 1]``."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--image {p} is not a file; give a PNG/JPEG path, or --index N for a toy test image")
    try:
        img = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise ConfigError(f"cannot read {p} as an image ({exc}); give a PNG or JPEG file") from exc
    return torch.from_numpy(img).permute(2, 0, 1) * 2.0 - 1.0


def _resize(image: Tensor, side: int) -> Tensor:
    import torch.nn.functional as F

    if image.shape[-2:] == (side, side):
        return image
    h, w = image.shape[-2:]
    crop = min(h, w)
    top, left = (h - crop) // 2, (w - crop) // 2
    image = image[:, top:top + crop, left:left + crop]
    mode = "area" if crop > side else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(image[None], size=(side, side), mode=mode, **kwargs)[0].clamp(-1, 1)


def probe_backbone(backbone: Any, image: Tensor, *, timestep: int = 500, label: int = 0, prompt: str = "",
                   seed: int = 0) -> Probe:
    """A probe: ``image`` (``[3, H, W]`` in ``[-1, 1]``, centre-cropped and resized to the model's
    resolution) encoded, noised to ``timestep`` with noise seeded by ``seed``, and denoised once
    conditioned on class ``label`` (class-conditional models) or ``prompt`` (text models)."""
    denoiser, family = find_denoiser(backbone)
    total = int(backbone.num_train_timesteps)
    if not isinstance(timestep, int) or isinstance(timestep, bool) or not 0 <= timestep < total:
        raise ConfigError(f"--timestep must be an integer in [0, {total - 1}] (the model's training schedule), "
                          f"got {timestep!r}")
    side = int(denoiser.config.sample_size) * int(getattr(backbone, "latent_factor", 1))
    image = _resize(image.float(), side)
    x0 = backbone.encode(image[None])
    expected = int(denoiser.config.in_channels)
    if x0.shape[1] != expected:
        raise ConfigError(f"this model denoises {expected}-channel inputs but the encoded image has {x0.shape[1]}; "
                          f"it needs a VAE (a latent model folder with vae/) or an RGB pixel-space model")
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    t = torch.tensor([timestep], dtype=torch.long, device=x0.device)
    x_t = backbone.add_noise(x0, noise, t)  # the model's own noising (DDPM or rectified flow)
    t_model = backbone.timestep_input(t)
    if getattr(backbone, "text_conditioned", False):
        backbone.set_classes(prompts=[prompt])
        what = f"prompt {prompt!r}"
    else:
        n_classes = int(getattr(backbone, "num_model_classes", label + 1))
        if not 0 <= label < n_classes:
            raise ConfigError(f"--label must be a class id in [0, {n_classes - 1}] for this model, got {label}")
        backbone.set_classes(prompts=[prompt or str(label)], label_ids=[label])
        what = f"class {label}"
    cond = backbone.class_conditions(torch.zeros(1, dtype=torch.long))

    def forward() -> Tensor:
        with torch.no_grad():
            return backbone.predict_noise(x_t, t_model, cond)

    shown = ((image + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    name = type(backbone).__name__
    return Probe(backbone, forward, shown, timestep, f"{name}, {what}, t={timestep}")
