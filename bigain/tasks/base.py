"""What the evaluation tasks share: a backbone built in ``configure_model`` with a compressor
attached to its denoiser, and the datamodule that describes the data."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import lightning as L

from bigain.adapters import find_adapter
from bigain.backbones import BACKBONES, DiffusionBackbone
from bigain.errors import ConfigError
from bigain.patching import apply
from bigain.registry import create_compressor

__all__ = ["DiffusionTask", "build_backbone"]


def build_backbone(name: str, options: dict[str, Any] | None) -> DiffusionBackbone:
    """Build a registered backbone, checking its options first."""
    cls = BACKBONES.get(name)
    options = dict(options or {})
    allowed = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"backbone {name!r} has no option(s) {unknown}; its options are {allowed}")
    return cls(**options)


class DiffusionTask(L.LightningModule):
    """Base of :class:`~bigain.tasks.DiffusionClassifier` and :class:`~bigain.tasks.DiffusionGenerator`.

    Subclasses take ``backbone``, ``backbone_options``, ``compressor``, ``compressor_options``,
    ``max_downsample``, ``blocks``, ``seed`` and ``compile`` among their keyword-only options, call
    ``super().__init__(backbone=..., compressor=..., compressor_options=...)`` first and
    ``self.save_hyperparameters()`` after their own checks.
    """

    def __init__(self, *, backbone: str, compressor: str, compressor_options: dict[str, Any] | None) -> None:
        super().__init__()
        self.backbone_class = BACKBONES.get(backbone)  # unknown names fail here, with suggestions
        self.compressor = create_compressor(compressor, **dict(compressor_options or {}))
        self.backbone: DiffusionBackbone | None = None
        self.handle = None

    def add_shared_identity(self, hp: dict[str, Any]) -> dict[str, Any]:
        """``hp`` with what every task's run identity records the same way: ``compressor_options`` (without
        the default ``similarity="blocked"``, so runs made before the option existed keep their identity) and
        ``weights``, the backbone's :meth:`~bigain.backbones.DiffusionBackbone.weights_digest` where it gives
        one (the toy backbones), so retrained weights under the same name make a new run."""
        options = self.compressor.hyperparameters()
        if options.get("similarity") == "blocked":
            options.pop("similarity")
        hp["compressor_options"] = options
        digest = self.backbone_class.weights_digest(dict(self.hparams.get("backbone_options") or {}))
        if digest is not None:
            hp["weights"] = digest
        return hp

    def check_backbone(self, backbone: DiffusionBackbone) -> None:
        """Validate options that depend on the loaded model (called once, before compressing)."""

    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        hp = self.hparams
        backbone = build_backbone(hp.backbone, hp.backbone_options)
        self.check_backbone(backbone)
        self.backbone = backbone
        selection = find_adapter(backbone).selection(max_downsample=hp.max_downsample, blocks=hp.blocks)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="bigain.apply selected no self-attention layer",
                                    category=UserWarning)  # an empty selection is an error here, below
            self.handle = apply(backbone, self.compressor, **selection, seed=hp.seed)
        if not self.handle.layers and hp.compressor != "none":
            levels = sorted({site.level for site in self.handle.adapter.sites()})
            raise ConfigError(
                f"{hp.compressor} would compress no layer of this {type(backbone.denoiser).__name__}: "
                f"{self.handle.skipped[0][1] if self.handle.skipped else 'it has no self-attention layer'}; "
                f"its attention sits at levels {levels}. Select layers with model.max_downsample (a UNet; SDXL "
                f"has no attention at level 1: use 2) or model.blocks (a transformer)")
        backbone.compile_denoiser(hp.get("compile", "none"))

    def prepare_predict(self, needs: str):
        """Build the model if needed and return the trainer's datamodule (``needs`` says what for)."""
        self.configure_model()
        dm = self.trainer.datamodule
        if dm is None:
            raise ConfigError(f"{type(self).__name__} needs a bigain datamodule ({needs})")
        if self.handle is not None:
            self.handle.reset_stats()
            self.declare_image_size(int(dm.image_size))
        return dm

    def declare_image_size(self, image_size: int) -> None:
        """Tell the compressor's adapter the latent it will see for ``image_size`` images
        (:meth:`bigain.adapters.DenoiserAdapter.declare_latent`: Flux's token grid, ahead of any call)."""
        if self.handle is not None:
            self.handle.adapter.declare_latent(self.backbone.latent_shape(image_size))
