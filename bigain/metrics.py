"""Image-generation metrics computed from saved images: FID, KID, IS, CLIP score, class fidelity.

Everything works from the PNGs a generation run wrote, so a run can be rescored (other extractor,
other metrics) without generating again. FID, KID and IS use torchmetrics' implementations fed with
features of a configurable extractor, named by a spec string:

* ``"inception"`` - the standard FID Inception-v3 (torch-fidelity's weights, fetched from their
  usual source or the torch hub cache). Offline without a cached copy it is recorded unavailable.
* ``"inception:/path/weights.pth"`` - the same network with a local weights file (torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``; a copy in the torch hub cache also works offline).
* ``"timm:<model>"`` - any timm model with its pretrained weights (downloaded by timm; offline, set
  ``HF_HUB_OFFLINE=1`` to fail at once instead of after retries);
  ``"timm:<model>@/path/weights.safetensors"`` loads a local weights file; ``"timm:<model>@random"``
  uses random weights (for tests only: the numbers mean nothing). Features are the pooled
  pre-logits; images are resized to the model's input size and normalised with its config.
* ``"toy"`` / ``"toy:/path/classifier.safetensors"`` - the toy classifier (``bigain/toy``).
* ``"pytorch-fid:/path/pt_inception-2015-12-05-6726825d.pth"`` - FID as the paper computed it:
  ``pytorch-fid``'s Inception network and weights (a local file; see :mod:`bigain.fid_inception`),
  each image resized to 299 x 299 bilinearly from its own size. FID and KID only (no IS head).

The real images are the datamodule's split (resized and centre-cropped like the model's inputs), or,
with ``fid_reference``, every image file of a folder, whole: what the paper used (``pytorch-fid`` on
the dataset's full image folder, e.g. Oxford-IIIT Pets' ``images/`` with both splits).

FIDs from different extractors are not comparable, so every result names its extractor. A metric
that cannot be computed (weights unavailable offline, too few images, no CLIP model) is recorded as
``{"unavailable": reason}`` and the others still run; a missing real-image set is an error.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigain.errors import BigainError, ConfigError, DatasetError

__all__ = ["METRIC_NAMES", "ExtractorSpec", "parse_extractor", "build_extractor", "MetricUnavailable",
           "score_images", "score_run", "load_png", "ImageFiles", "single_label", "TOY_CLASSIFIER_PATH",
           "IMAGE_EXTENSIONS", "reference_files", "ReferenceFolder"]

METRIC_NAMES = ("fid", "kid", "is", "clip_score", "class_fidelity")
TOY_CLASSIFIER_PATH = Path(__file__).resolve().parent / "toy" / "assets" / "classifier.safetensors"
_SPEC_HELP = ("'inception', 'inception:/path/to/weights.pth', 'timm:<model>', 'timm:<model>@<weights file>', "
              "'timm:<model>@random', 'toy', 'toy:/path/to/classifier.safetensors' or "
              "'pytorch-fid:/path/to/pt_inception-2015-12-05-6726825d.pth'")
#: The image files a reference folder contributes (any letter case, unlike pytorch-fid's lowercase glob).
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
_INCEPTION_FIX = "give a local weights file with inception:/path/to/weights.pth or use timm:<model>@<weights file>"


class MetricUnavailable(BigainError):
    """A metric cannot be computed here (recorded in the run, not raised to the user)."""


@dataclass(frozen=True)
class ExtractorSpec:
    """A parsed extractor spec: ``kind`` (inception, timm, toy), timm ``model``, ``weights``."""

    kind: str
    model: str | None = None
    weights: str | None = None

    def __str__(self) -> str:
        if self.kind == "timm":
            return f"timm:{self.model}" + (f"@{self.weights}" if self.weights else "")
        return self.kind + (f":{self.weights}" if self.weights else "")


def _local_file(path: str, spec: str) -> str:
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"extractor {spec!r}: weights file {path} does not exist; give an existing local file")
    return str(Path(path).expanduser())


def parse_extractor(spec: str) -> ExtractorSpec:
    """Check an extractor spec's syntax (and that a named timm model / local file exists)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"an extractor spec must be a non-empty string, one of {_SPEC_HELP}; got {spec!r}")
    kind, _, rest = spec.strip().partition(":")
    if kind in ("inception", "toy"):
        return ExtractorSpec(kind, weights=_local_file(rest, spec) if rest else None)
    if kind == "pytorch-fid":
        from bigain.fid_inception import PYTORCH_FID_URL, PYTORCH_FID_WEIGHTS

        if not rest or not Path(rest).expanduser().is_file():
            where = f"{rest} does not exist" if rest else "no weights file is given"
            raise ConfigError(f"extractor {spec!r}: {where}. pytorch-fid's Inception weights are read from a local "
                              f"file only: download {PYTORCH_FID_WEIGHTS} from {PYTORCH_FID_URL} on a machine "
                              f"with network access and write pytorch-fid:/path/to/{PYTORCH_FID_WEIGHTS}")
        return ExtractorSpec(kind, weights=str(Path(rest).expanduser()))
    if kind == "timm":
        name, _, weights = rest.partition("@")
        if not name:
            raise ConfigError(f"extractor {spec!r} names no timm model; write timm:<model>, e.g. timm:resnet50")
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"extractor {spec!r}: timm has no model {name!r}.{hint} "
                              f"`python -c 'import timm; print(timm.list_models())'` lists them")
        if weights and weights != "random":
            weights = _local_file(weights, spec)
        return ExtractorSpec("timm", name, weights or None)
    raise ConfigError(f"unknown feature extractor {spec!r}; use one of {_SPEC_HELP}")


class Extractor(nn.Module):
    """uint8 images ``[B, 3, H, W]`` -> (features ``[B, D]``, logits ``[B, K]`` or None)."""

    def __init__(self, spec: ExtractorSpec, net: nn.Module, prepare: Callable[[Tensor], Tensor],
                 features: Callable[[Tensor], tuple[Tensor, Tensor | None]]) -> None:
        super().__init__()
        self.spec, self.net, self._prepare, self._features = spec, net.eval().requires_grad_(False), prepare, features

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        device = next(self.net.parameters()).device
        feats, logits = self._features(self._prepare(images.to(device)))
        return feats.float().flatten(1), None if logits is None else logits.float()


def build_extractor(spec: str | ExtractorSpec, device: torch.device | str = "cpu") -> Extractor:
    """Load an extractor; raises :class:`MetricUnavailable` (with the fix) when its weights can't be had."""
    spec = parse_extractor(spec) if isinstance(spec, str) else spec
    if spec.kind == "inception":
        try:  # torchmetrics' FID network, also giving the logits IS needs
            from torchmetrics.image.fid import NoTrainInceptionV3

            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=spec.weights)
        except ModuleNotFoundError as exc:
            raise MetricUnavailable(f"torch-fidelity is not installed (pip install torch-fidelity) and the Inception "
                                    f"extractor needs it; or {_INCEPTION_FIX}") from exc
        except Exception as exc:  # offline download, bad file: recorded, never fatal
            raise MetricUnavailable(f"{type(exc).__name__}: {exc}; {_INCEPTION_FIX}") from exc
        return Extractor(spec, net, lambda x: x, lambda x: tuple(net._torch_fidelity_forward(x))).to(device)
    if spec.kind == "pytorch-fid":
        from bigain.fid_inception import load_pytorch_fid_inception

        try:
            net = load_pytorch_fid_inception(spec.weights)
        except ConfigError as exc:  # a file of another network: recorded, the images are kept for a rescore
            raise MetricUnavailable(str(exc)) from exc
        return Extractor(spec, net, lambda x: x.float() / 255.0, lambda x: (net(x), None)).to(device)
    if spec.kind == "toy":
        from bigain.toy.train import build_toy_classifier, classifier_input

        path = spec.weights or TOY_CLASSIFIER_PATH
        if not Path(path).is_file():
            raise MetricUnavailable(f"the toy classifier's weights are not at {path}; train them with "
                                    f"`bigain toy train`, or give toy:/path/to/classifier.safetensors")
        net = build_toy_classifier(path)
        return Extractor(spec, net, lambda x: classifier_input(x.float() / 127.5 - 1.0),
                         lambda x: _timm_outputs(net, x)).to(device)
    return _build_timm(spec, device)


def _timm_outputs(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    fmap = net.forward_features(x)
    feats = net.forward_head(fmap, pre_logits=True)
    return feats, (net.forward_head(fmap) if getattr(net, "num_classes", 0) else None)


def _build_timm(spec: ExtractorSpec, device: torch.device | str) -> Extractor:
    import timm

    try:
        if spec.weights == "random":
            net = timm.create_model(spec.model, pretrained=False)
        elif spec.weights:
            net = timm.create_model(spec.model, pretrained=True, pretrained_cfg_overlay={"file": spec.weights})
        else:
            net = timm.create_model(spec.model, pretrained=True)
    except Exception as exc:  # no network, no cache, a file of another architecture
        raise MetricUnavailable(f"could not load timm model {spec.model!r} ({type(exc).__name__}: {exc}); "
                                f"give a local weights file with timm:{spec.model}@/path/to/weights") from exc
    cfg = timm.data.resolve_model_data_config(net)
    size = tuple(cfg["input_size"][-2:])
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def prepare(x: Tensor) -> Tensor:
        x = x.float() / 255.0
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - mean.to(x.device)) / std.to(x.device)

    return Extractor(spec, net, prepare, lambda x: _timm_outputs(net, x)).to(device)


class _Features(nn.Module):
    """Hands precomputed features to a torchmetrics metric (features are extracted once for all)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def load_png(path: str | Path) -> Tensor:
    """A saved image as uint8 ``[3, H, W]``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def _batches(images: Iterable[Tensor], size: int) -> Iterator[Tensor]:
    """Batches of at most ``size`` images; images of different sizes never share a batch."""
    chunk: list[Tensor] = []
    for img in images:
        if chunk and tuple(img.shape[-3:]) != tuple(chunk[0].shape):
            yield torch.stack(chunk)
            chunk = []
        if img.ndim == 4:  # already a batch
            chunk.extend(img)
        else:
            chunk.append(img)
        while len(chunk) >= size:
            yield torch.stack(chunk[:size])
            chunk = chunk[size:]
    if chunk:
        yield torch.stack(chunk)


def _extract(extractor: Extractor, images: Iterable[Tensor], batch_size: int) -> tuple[Tensor, Tensor | None]:
    feats, logits = [], []
    for batch in _batches(images, batch_size):
        f, lg = extractor(batch)
        feats.append(f.cpu())
        if lg is not None:
            logits.append(lg.cpu())
    if not feats:
        return torch.zeros(0, 0), None
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def _seeded(fn: Callable[[], Any]) -> Any:
    """KID and IS draw random subsets from the global RNG: make them reproducible and leave it untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fn()


def _quiet(cls: type, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # "will save all extracted features": they are features, not images
        warnings.simplefilter("ignore", UserWarning)
        return cls(**kwargs)


def _distribution_metrics(wanted: Sequence[str], fake: tuple[Tensor, Tensor | None], real: Tensor | None,
                          extractor: str, reference: str | None = None) -> dict[str, dict[str, Any]]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    feats, logits = fake
    n = int(feats.shape[0])
    out: dict[str, dict[str, Any]] = {}
    for name in wanted:
        result: dict[str, Any] = {"extractor": extractor, "images": n}
        try:
            if name == "is":
                if logits is None:
                    raise MetricUnavailable(f"{extractor} has no classifier head (IS needs class logits)")
                if n < 2:
                    raise MetricUnavailable(f"IS needs at least 2 generated images, got {n}")
                metric = _quiet(InceptionScore, feature=_Features(int(logits.shape[1])), splits=min(10, n))
                metric.update(logits)
                mean, std = _seeded(metric.compute)
                result.update(value=float(mean), std=float(std))
            else:
                m = int(real.shape[0])
                result["real_images"] = m
                if reference is not None:
                    result["reference"] = reference
                if min(n, m) < 2:
                    raise MetricUnavailable(f"{name.upper()} needs at least 2 generated and 2 real images, "
                                            f"got {n} and {m}")
                subset = min(1000, n, m)  # KID's subsets cannot be larger than either set
                metric = (FrechetInceptionDistance(feature=_Features(int(feats.shape[1]))) if name == "fid" else
                          _quiet(KernelInceptionDistance, feature=_Features(int(feats.shape[1])), subsets=100,
                                 subset_size=subset))
                metric.update(real.double(), real=True)
                metric.update(feats.double(), real=False)
                if name == "fid":
                    result["value"] = float(metric.compute())
                else:
                    mean, std = _seeded(metric.compute)
                    result.update(value=float(mean), std=float(std), subset_size=subset)
            if not math.isfinite(result["value"]):
                raise MetricUnavailable(f"{name.upper()} came out non-finite ({result['value']})")
        except MetricUnavailable as exc:
            result = {"extractor": extractor, "images": n, "unavailable": str(exc)}
        out[name] = result
    return out


def _clip_score(clip_model: str | None, images: Sequence[Tensor], prompts: Sequence[str | None],
                device: torch.device | str, batch_size: int) -> dict[str, Any]:
    if not clip_model:
        raise MetricUnavailable("no clip_model given; set clip_model to a CLIP hub id "
                                "(openai/clip-vit-large-patch14) or a local folder saved with save_pretrained")
    keep = [i for i, p in enumerate(prompts) if p]
    if not keep:
        raise MetricUnavailable("no generated image has a prompt")
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = _CLIPFeatures(CLIPModel.from_pretrained(clip_model))
        processor = CLIPProcessor.from_pretrained(clip_model)
    except Exception as exc:
        raise MetricUnavailable(f"could not load CLIP model {clip_model!r} ({type(exc).__name__}: {exc}); "
                                f"give a local folder saved with save_pretrained") from exc
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    for start in range(0, len(keep), batch_size):
        chunk = keep[start:start + batch_size]
        metric.update(torch.stack([images[i] for i in chunk]).to(device), [str(prompts[i]) for i in chunk])
    return {"value": float(metric.compute()), "model": clip_model, "images": len(keep)}


class _CLIPFeatures(nn.Module):
    """A CLIP model whose feature getters return tensors (transformers 5 returns model outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model.eval(), model.config

    @torch.no_grad()
    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def score_images(
    fake_images: Sequence[Tensor],
    real_images: Iterable[Tensor] | None,
    *,
    metrics: Sequence[str] = METRIC_NAMES,
    feature_extractor: str = "inception",
    prompts: Sequence[str | None] | None = None,
    labels: Sequence[int | None] | None = None,
    clip_model: str | None = None,
    fidelity_classifier: str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    fid_reference: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Score generated uint8 images ``[3, H, W]`` against real ones.

    Args:
        fake_images: the generated images.
        real_images: the reference images (uint8, single images or batches); needed for FID / KID.
        metrics: which of :data:`METRIC_NAMES` to compute.
        feature_extractor: extractor spec for FID, KID and IS (see the module docstring).
        prompts: per generated image, its prompt (CLIP score).
        labels: per generated image, its class id in the fidelity classifier's label space.
        clip_model: CLIP hub id or local folder (CLIP score).
        fidelity_classifier: extractor spec of the classifier judging class fidelity.
        device: where the networks run.
        batch_size: images per network call.
        fid_reference: a folder whose image files (all of them, whole) are the real images of FID
            and KID instead of ``real_images``, which is then not read (see :func:`reference_files`).

    Returns:
        ``{metric: {"value": ..., "extractor": ..., ...}}`` or ``{metric: {"unavailable": reason}}``.

    Raises:
        ConfigError: an unknown metric or extractor.
        DatasetError: FID or KID asked for, but ``real_images`` yields no image; ``fid_reference``
            is not a folder of images, or one of its images cannot be read.
    """
    unknown = sorted(set(metrics) - set(METRIC_NAMES))
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    spec = parse_extractor(feature_extractor)
    results: dict[str, dict[str, Any]] = {}
    distribution = [m for m in METRIC_NAMES if m in metrics and m in ("fid", "kid", "is")]
    real_iter: Iterator[Tensor] | None = None
    reference = None
    if any(m in metrics for m in ("fid", "kid")) and fid_reference is not None:
        folder = ReferenceFolder(fid_reference)
        reference = str(folder.root)
        real_iter = iter(folder)
    elif any(m in metrics for m in ("fid", "kid")):
        real_iter = iter(real_images if real_images is not None else ())
        first = next(real_iter, None)
        if first is None:
            raise DatasetError("FID and KID need the datamodule's real images, but it yielded none; point the "
                               "datamodule at the dataset's images (its root), or leave fid and kid out of metrics")
        real_iter = _chain(first, real_iter)
    if distribution:
        try:
            extractor = build_extractor(spec, device)
        except MetricUnavailable as exc:
            results.update({m: {"extractor": str(spec), "unavailable": str(exc)} for m in distribution})
        else:
            fake = _extract(extractor, fake_images, batch_size)
            real = _extract(extractor, real_iter, batch_size)[0] if real_iter is not None else None
            results.update(_distribution_metrics(distribution, fake, real, str(spec), reference))
            del extractor
    if "clip_score" in metrics:
        try:
            results["clip_score"] = _clip_score(clip_model, fake_images, prompts or [None] * len(fake_images),
                                                device, batch_size)
        except MetricUnavailable as exc:
            results["clip_score"] = {"model": clip_model, "unavailable": str(exc)}
    if "class_fidelity" in metrics:
        results["class_fidelity"] = _class_fidelity(fidelity_classifier, fake_images, labels, device, batch_size)
    return {m: results[m] for m in METRIC_NAMES if m in results}


def _chain(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def _class_fidelity(spec: str | None, images: Sequence[Tensor], labels: Sequence[int | None] | None,
                    device: torch.device | str, batch_size: int) -> dict[str, Any]:
    try:
        if not spec:
            raise MetricUnavailable("no fidelity_classifier given; set it to a classifier spec "
                                    "(timm:<model>@<weights file>, or toy for the toy model)")
        keep = [i for i, lab in enumerate(labels or []) if lab is not None][: len(images)]
        if not keep:
            raise MetricUnavailable("the generated images have no single class label (class fidelity needs one)")
        classifier = build_extractor(spec, device)
        _, logits = _extract(classifier, (images[i] for i in keep), batch_size)
        if logits is None:
            raise MetricUnavailable(f"{spec} has no classifier head")
        targets = torch.tensor([int(labels[i]) for i in keep])
        if int(targets.max()) >= logits.shape[1] or int(targets.min()) < 0:
            raise MetricUnavailable(f"{spec} knows {logits.shape[1]} classes, but the labels range over "
                                    f"{int(targets.min())}..{int(targets.max())}; use a classifier in the "
                                    f"dataset's label space")
        correct = int((logits.argmax(1) == targets).sum())
        return {"value": correct / len(keep), "correct": correct, "images": len(keep), "classifier": str(spec)}
    except MetricUnavailable as exc:
        return {"classifier": spec, "unavailable": str(exc)}


def score_run(
    run_dir: str | Path,
    real_images: Iterable[Tensor] | None,
    *,
    prompts: Mapping[int, str] | None = None,
    labels: Mapping[int, int] | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Score the images a generation run saved (``records.parquet``, else its shards).

    Args:
        run_dir: the run folder.
        real_images: reference images (see :func:`score_images`).
        prompts: index -> prompt; default: the records' ``prompt`` column.
        labels: index -> class id in the fidelity classifier's label space; default: the records' ``label``.
        **options: passed on to :func:`score_images` (metrics, feature_extractor, clip_model, ...).
    """
    import pandas as pd

    from bigain.runs import RunFolder

    run = RunFolder(run_dir)
    parquet = run.path / "records.parquet"
    df = pd.read_parquet(parquet) if parquet.is_file() else run.merged_records()
    if df.empty:
        raise DatasetError(f"{run.path} holds no generated images; run `bigain generate` on it first")
    indices = [int(i) for i in df["index"]]
    images = ImageFiles(run.path / p for p in df["path"])
    if prompts is None and "prompt" in df:
        prompts = {i: p for i, p in zip(indices, df["prompt"]) if isinstance(p, str)}
    if labels is None and "label" in df:
        labels = {i: lab for i, lab in zip(indices, map(single_label, df["label"])) if lab is not None}
    return score_images(images, real_images, prompts=[(prompts or {}).get(i) for i in indices],
                        labels=[(labels or {}).get(i) for i in indices], **options)


def single_label(value: Any) -> int | None:
    """A record's label as an int; None for multi-label lists and missing values."""
    if isinstance(value, (bool, str)) or value is None:
        return None
    if isinstance(value, (int, float)) or hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = float(value)
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return None


def reference_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (extensions :data:`IMAGE_EXTENSIONS`, any letter case),
    sorted by name; subfolders and other files are left out.

    Raises:
        DatasetError: ``folder`` is not a directory, or holds no image file.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"fid_reference {root} is not a folder; give the folder that holds the real images "
                           f"(for Oxford-IIIT Pets, <root>/oxford-iiit-pet/images)")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"fid_reference {root} holds no image file ({', '.join(IMAGE_EXTENSIONS)}); images in "
                           f"its subfolders are not read: give the folder that holds them directly")
    return files


class ReferenceFolder:
    """Every image of a reference folder, whole, as uint8 ``[3, H, W]`` (loaded one at a time)."""

    def __init__(self, folder: str | Path) -> None:
        self.root = Path(folder).expanduser().resolve()
        self.files = reference_files(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Tensor]:
        for path in self.files:
            try:
                yield load_png(path)
            except Exception as exc:  # a truncated or mislabelled file: FID over fewer images is not the paper's
                raise DatasetError(f"reference image {path} cannot be read ({type(exc).__name__}: {exc}); "
                                   f"repair or remove it") from exc


class ImageFiles(Sequence):
    """Saved images, loaded (uint8 ``[3, H, W]``) only when indexed: memory stays flat."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        return load_png(self.paths[i])
