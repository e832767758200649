"""Measure the bundled toy models and write their model card.

Everything runs in-process on the CPU (or a GPU when one is there), without Lightning, so the card
can be regenerated quickly after ``bigain toy train``:

* the toy classifier's top-1 accuracy on real toy test images;
* the diffusion-classifier accuracy of the toy DiT (default 5/20 protocol), uncompressed and with
  70% ToMe (the dataset must be hard enough for compression to cost accuracy);
* the class fidelity of generated samples (the toy classifier's top-1 on DiT samples of each class).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigain.toy.data import SHAPE_CLASSES, TEXTURE_CLASSES, TOY_CLASSES, ToyShapes

__all__ = ["ASSETS", "classifier_accuracy", "diffusion_classifier_accuracy", "class_fidelity", "write_model_card"]

ASSETS = Path(__file__).resolve().parent / "assets"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def classifier_accuracy(weights: str | Path = ASSETS / "classifier.safetensors", *, images: int = 1000) -> float:
    """Top-1 of the toy classifier on the first ``images`` toy test images."""
    from bigain.toy.train import build_toy_classifier, classifier_input

    model = build_toy_classifier(weights).eval()
    data = ToyShapes("test", length=images)
    correct = 0
    for start in range(0, images, 250):
        x, y = data.batch(range(start, min(images, start + 250)))
        correct += int((model(classifier_input(x)).argmax(-1) == y).sum())
    return correct / images


def diffusion_classifier_accuracy(
    *,
    backbone: str = "toy",
    path: str | Path | None = None,
    images: int = 500,
    compressor: str = "none",
    compressor_options: dict[str, Any] | None = None,
    blocks: Any = "paper",
    dtype: str = "float32",
    n_samples: tuple[int, ...] = (5, 20),
    to_keep: tuple[int, ...] = (5, 1),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Accuracy of a toy denoiser (``backbone``: ``toy``, the DiT, or ``toy-unet``) as a diffusion
    classifier on the first ``images`` test images, overall and on the texture / shape halves."""
    from bigain.tasks.classification import DiffusionClassifier

    options = {"dtype": dtype} if path is None else {"path": str(path), "dtype": dtype}
    module = DiffusionClassifier(backbone=backbone, backbone_options=options, compressor=compressor,
                                 compressor_options=compressor_options, blocks=blocks, n_samples=list(n_samples),
                                 to_keep=list(to_keep), batch_size=128)
    module.configure_model()
    module.backbone.to(_device())
    module.num_classes, module.multilabel = len(TOY_CLASSES), False
    module.backbone.set_classes(prompts=list(TOY_CLASSES))
    data = ToyShapes("test", length=images)
    hits = {"all": 0, "texture": 0, "shape": 0}
    counts = {"all": 0, "texture": 0, "shape": 0}
    for i in range(images):
        item = data[i]
        record = module.classify(item["image"], i, item["label"])
        kind = "texture" if item["label"] in TEXTURE_CLASSES else "shape"
        for key in ("all", kind):
            counts[key] += 1
            hits[key] += int(record["correct"])
        if progress is not None:
            progress(i + 1, images)
    return {f"accuracy_{k}" if k != "all" else "accuracy": hits[k] / counts[k] for k in hits if counts[k]}


def class_fidelity(*, backbone: str = "toy", path: str | Path | None = None, per_class: int = 10, steps: int = 50,
                   guidance_scale: float = 4.0, classifier: str | Path = ASSETS / "classifier.safetensors",
                   seed: int = 0, dtype: str = "float32") -> float:
    """Toy-classifier top-1 on ``per_class`` samples of each class from a toy denoiser (``backbone``)
    (DDIM, classifier-free guidance), sampled exactly as ``bigain generate`` samples them."""
    from bigain.tasks.generation import DiffusionGenerator, initial_noise
    from bigain.toy.train import build_toy_classifier, classifier_input

    options = {"dtype": dtype} if path is None else {"path": str(path), "dtype": dtype}
    generator = DiffusionGenerator(backbone=backbone, backbone_options=options, steps=steps,
                                   guidance_scale=guidance_scale, seed=seed)
    generator.configure_model()
    backbone = generator.backbone.to(_device())
    backbone.set_classes(prompts=list(TOY_CLASSES))
    judge = build_toy_classifier(classifier).eval().to(_device())
    labels = torch.arange(len(TOY_CLASSES)).repeat_interleave(per_class)
    shape = backbone.latent_shape(32)
    noise = torch.stack([initial_noise(seed, i, shape) for i in range(len(labels))])
    images = generator.sample(backbone.class_conditions(labels), noise)
    with torch.no_grad():
        pred = judge(classifier_input(images)).argmax(-1).cpu()
    return float((pred == labels).float().mean())


def _toy_unet_layout(unet_dir: Path) -> str:
    """The toy UNet's blocks in words, counted on the UNet its config builds: the config saved in
    ``unet_dir`` (the model the card describes), else :data:`bigain.toy.train.TOY_UNET_CONFIG`."""
    from diffusers import UNet2DConditionModel

    from bigain.toy.train import TOY_UNET_CONFIG, _as_list

    config = UNet2DConditionModel.load_config(unet_dir) if (unet_dir / "config.json").is_file() else TOY_UNET_CONFIG
    with torch.device("meta"):  # the structure only: no weights are allocated or initialised
        unet = UNet2DConditionModel.from_config(config)
    kinds = [type(m).__name__ for m in unet.modules()]
    width, heads = unet.config.block_out_channels[-1], _as_list(unet.config.attention_head_dim)[-1]
    return (f"a down block, {'the middle block' if unet.mid_block is not None else 'no middle block'} and an up "
            f"block, width {width}: {kinds.count('ResnetBlock2D')} ResNet blocks and "
            f"{kinds.count('BasicTransformerBlock')} transformer blocks of {heads} heads x {width // heads} channels")


def write_model_card(assets: str | Path, metrics: dict[str, Any], *, command: str, seed: int) -> Path:
    """``MODEL_CARD.md`` beside the models: command, data, seed, training curves, metrics.

    ``metrics`` holds the classifier's numbers at the top level and each toy denoiser's under its key
    in :data:`bigain.toy.TOY_DENOISERS` (``dit``, ``unet``); a denoiser that was not measured is left
    out of the table.
    """
    import pandas as pd

    from bigain.toy import TOY_DENOISERS

    assets = Path(assets)
    (assets / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logs = {spec["label"]: assets / spec["folder"] / "training_log.csv" for spec in TOY_DENOISERS.values()}
    logs = {label: log for label, log in logs.items() if log.is_file()}
    curve_png = None
    if logs:
        from bigain.plots import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, log in logs.items():
            df = pd.read_csv(log)
            line, = ax.plot(df["step"], df["loss_smoothed"], label=f"{label} (smoothed)")
            ax.plot(df["step"], df["loss"], alpha=0.25, color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("weighted epsilon MSE")
        ax.set_title("Toy denoisers: training curves")
        ax.legend()
        fig.tight_layout()
        curve_png = save_figure(fig, assets / "training_curve.png", dpi=100)

    measured = {key: metrics[key] for key in TOY_DENOISERS if isinstance(metrics.get(key), dict)}

    def pct(values: dict[str, Any], key: str) -> str:
        value = values.get(key)
        return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "not measured"

    def row(text: str, key: str, second: str | None = None) -> str:
        cells = [pct(m, key) + (f" / {pct(m, second)}" if second else "") for m in measured.values()]
        return f"| {text} | " + " | ".join(cells) + " |"

    dtypes = sorted({m.get("evaluation_dtype", "float32") for m in measured.values()})
    per_class = sorted({m.get("fidelity_per_class") for m in measured.values()} - {None})
    unet_layout = _toy_unet_layout(assets / TOY_DENOISERS["unet"]["folder"] / "unet")
    header = "| metric | " + " | ".join(TOY_DENOISERS[k]["label"] for k in measured) + " |"
    lines = [
        "# Toy models (bundled with bigain)",
        "",
        "Small models trained on the procedural toy dataset (`bigain.toy.data`), so that the main job runs",
        "offline on a CPU. They are loaded through exactly the code paths a real checkpoint takes.",
        "",
        "## Reproduce",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Seed {seed} where a command does not give one; train images from seed 1000, test images from seed 2000",
        "(disjoint). Deterministic for a given seed, precision, PyTorch version and thread count.",
        "",
        "## Data",
        "",
        "32x32 RGB, 10 balanced classes (label = index % 10): " + ", ".join(TOY_CLASSES) + ".",
        f"Classes {list(TEXTURE_CLASSES)} differ only in a low-contrast fine texture inside a random disk or",
        f"rectangle; classes {list(SHAPE_CLASSES)} only in a coarse solid shape. Random position, size,",
        "colours, faint background clutter and pixel noise.",
        "",
        "## Models",
        "",
        "- `toy-dit/` (backbone `toy`): diffusers `DiTTransformer2DModel`, pixel space, patch 2 (256 tokens),",
        "  6 blocks, width 128, 4 heads, 10 classes + the null class (label dropout 0.1, for classifier-free",
        "  guidance). float32 weights.",
        *textwrap.wrap(
            "- `toy-unet/` (backbone `toy-unet`): diffusers `UNet2DConditionModel` on 2x2 pixel patches stacked into "
            f"channels (12 x 16 x 16: 256 tokens, as many as the DiT's), one resolution level - {unet_layout} - so "
            "every one of its self-attention layers is one the compressors act on. It cross-attends to a learned "
            "prompt of 4 tokens x 64 per class (`class_prompts.safetensors`, plus a null prompt: label dropout 0.1). "
            "float16 weights; trained at learning rate 1e-3 with a 0.999 weight average, bias-corrected for its "
            "starting weights (steps: the command above).", width=100, subsequent_indent="  "),
        "- Both denoisers: epsilon prediction on the DDPM linear schedule (1000 steps), min-SNR-5 loss",
        "  weighting, AdamW, cosine learning rate, EMA weights, bf16 autocast on the CPU.",
        "- `classifier.safetensors`: timm `resnet10t` with channels (32, 64, 128, 256), fp16 weights, input",
        "  upsampled to 64x64 (nearest). The feature extractor of the toy FID and the judge of class fidelity.",
        "",
        "## Metrics",
        "",
        f"Toy classifier top-1 on real test images ({metrics.get('classifier_images', '?')}): "
        f"{pct(metrics, 'classifier_accuracy')}.",
        "",
    ]
    if measured:
        lines += [
            header,
            "|---|" + "---|" * len(measured),
            "| test images (classification) | " + " | ".join(str(m.get("dc_images", "?")) for m in measured.values())
            + " |",
            row(f"diffusion-classifier accuracy, uncompressed, 5/20 protocol ({'/'.join(dtypes)})", "dc_accuracy"),
            row("... texture classes / shape classes", "dc_accuracy_texture", "dc_accuracy_shape"),
            "| compressed layers | " + " | ".join(m.get("tome_layers", "?") for m in measured.values()) + " |",
            row("diffusion-classifier accuracy, `tome` ratio 0.7", "dc_tome70_accuracy"),
            row(f"class fidelity of generated samples ({'/'.join(map(str, per_class))} per class, DDIM 50, "
                "guidance 4)", "class_fidelity"),
            "",
        ]
    notes = metrics.get("notes") or []
    if notes:  # what the numbers above mean, written by whoever measured them (kept in metrics.json)
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    if curve_png is not None:
        lines += ["## Training curves", "", "![training curves](training_curve.png)", ""]
    card = assets / "MODEL_CARD.md"
    card.write_text("\n".join(lines))
    return card
