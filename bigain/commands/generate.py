"""Generate images with a (compressed) diffusion model and score them (FID, KID, IS, CLIP score,
class fidelity).

Configured LightningCLI-style: `bigain generate --config run.yaml`, every option overridable by a
flag (`--model.compressor tome --model.steps 50 --data toy --trainer.devices 2`); `--print_config`
shows the full configuration. --help lists the options that matter for evaluation, --help_all
every Lightning Trainer option too. Results go to --run_dir: images/{index:06d}.png, records.parquet,
contact_sheet.png, summary.csv / summary.md, run.json (with every metric's details and the
extractor that produced it). Ctrl-C (SIGINT) or SIGTERM stops a run within seconds (exit status
130 / 143, finished images kept); it resumes where it stopped when started again with the same
configuration. The metric options (metrics, feature_extractor, clip_model,
fidelity_classifier) are not part of the run's identity: running a finished run again with other
metric options rescores its saved images without generating them again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from bigain.analysis.samples import distinguishing_parts, write_contact_sheet
from bigain.commands._evaluate import model_meta, run_evaluation
from bigain.metrics import ImageFiles, score_images, single_label
from bigain.reporting import write_summary
from bigain.runs import atomic_write_parquet
from bigain.tasks.generation import METRIC_OPTIONS, DiffusionGenerator, to_uint8

__all__ = ["main", "real_images"]


def real_images(dm) -> Iterator[torch.Tensor]:
    """The datamodule's real images (every selected index, unreadable ones left out) as uint8 batches."""
    dm.skip_indices(set())
    dm.setup("predict")
    for batch in dm.predict_dataloader():
        if len(batch["index"]) and batch.get("image") is not None:
            yield to_uint8(batch["image"])


def _finalize(run, model, dm, trainer) -> dict[str, Any]:
    df = run.merged_records()
    atomic_write_parquet(df, run.path / "records.parquet")
    hp = model.hparams
    indices = [int(i) for i in df["index"]]
    images = ImageFiles(run.path / p for p in df.get("path", []))
    prompts, labels, captions = [], [], []
    label_ids = dm.label_ids
    class_prompts = [str(p) for p in (dm.prompts or [])]
    short = dict(zip(class_prompts, distinguishing_parts(class_prompts)))  # "a toy image of a circle" -> "circle"
    for row in df.to_dict("records"):
        label = single_label(row.get("label"))  # None for multi-label (COCO) records
        prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else (
            dm.prompts[label] if label is not None else None)
        prompts.append(prompt)
        labels.append(None if label is None else label_ids[label] if label_ids else label)  # classifier's ids
        captions.append(f"{row['index']}: {short.get(prompt, prompt) if prompt is not None else ''}")
    if indices:
        write_contact_sheet(run.path / "contact_sheet.png", [images[i] for i in range(min(64, len(images)))],
                            captions[:64])
    device = trainer.strategy.root_device
    metrics = score_images(images, real_images(dm), metrics=hp.metrics, feature_extractor=hp.feature_extractor,
                           prompts=prompts, labels=labels, clip_model=hp.clip_model,
                           fidelity_classifier=hp.fidelity_classifier, fid_reference=hp.get("fid_reference"),
                           device=device) if indices else {}
    summary: dict[str, Any] = {
        "task": "generate", "backbone": hp.backbone, "dataset": dm.name or type(dm).__name__,
        "compressor": hp.compressor, "hyperparameters": model.compressor.hyperparameters(), "seed": hp.seed,
        "sampler": model.sampler_name, "steps": hp.steps, "guidance_scale": model.guidance, "images": len(df),
        "seconds_per_image": float(df["seconds"].mean()) if "seconds" in df and len(df) else None,
        "feature_extractor": hp.feature_extractor,
        "fid_reference": hp.get("fid_reference"),  # None: the datamodule's own real images
    }
    for name, result in metrics.items():
        summary[name] = result.get("value", "unavailable")
    row = {**summary, "hyperparameters": str(summary["hyperparameters"])}
    write_summary(row, run.path, title=f"Generation: {hp.compressor} on {summary['dataset']}",
                  skipped=run.bad_images())
    run.update_meta(metrics=metrics, metric_options={k: hp[k] for k in METRIC_OPTIONS}, **model_meta(run, model, dm))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_evaluation(argv, task="generate", model_class=DiffusionGenerator, finalize=_finalize,
                          description=__doc__)
