"""Evaluate a (compressed) diffusion model as an image classifier (the Diffusion Classifier protocol).

Configured LightningCLI-style: `bigain classify --config run.yaml`, every option overridable by a
flag (`--model.compressor tome --model.compressor_options '{ratio: 0.7}' --data toy
--trainer.devices 2`); `--print_config` shows the full configuration. --help lists the options
that matter for evaluation, --help_all every Lightning Trainer option too. Results go to --run_dir:
records.parquet, summary.csv / summary.md, run.json. Ctrl-C (SIGINT) or SIGTERM stops a run
within seconds (exit status 130 / 143, every rank, finished records kept); it resumes where it
stopped when started again with the same configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bigain.commands._evaluate import model_meta, run_evaluation
from bigain.reporting import classification_summary, write_summary
from bigain.runs import atomic_write_parquet
from bigain.tasks.classification import DiffusionClassifier


def _finalize(run, model, dm, trainer) -> dict[str, Any]:
    df = run.merged_records()
    atomic_write_parquet(df, run.path / "records.parquet")
    hp = model.hparams
    summary = {"task": "classify", "backbone": hp.backbone, "dataset": dm.name or type(dm).__name__,
               "compressor": hp.compressor, "hyperparameters": model.compressor.hyperparameters(),
               "seed": hp.seed, **classification_summary(df)}
    row = {**summary, "hyperparameters": str(summary["hyperparameters"])}
    write_summary(row, run.path, title=f"Classification: {hp.compressor} on {summary['dataset']}",
                  skipped=run.bad_images())
    run.update_meta(**model_meta(run, model, dm))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_evaluation(argv, task="classify", model_class=DiffusionClassifier, finalize=_finalize,
                          description=__doc__)
