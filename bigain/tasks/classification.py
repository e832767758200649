"""Diffusion-classifier evaluation as a LightningModule (predict loop only).

The backbone is built in ``configure_model`` (on the right device, once per process), the compressor
attached to its denoiser, and every image classified with the adaptive protocol of
:mod:`bigain.tasks.adaptive`. ``predict_step`` returns records; a
:class:`~bigain.runs.RecordWriter` callback appends them to the rank's shard. No collectives run in
``predict_step``: ranks never wait on each other until the end.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch

from bigain.backbones import DiffusionBackbone
from bigain.backbones.base import CompileMode, check_compile_mode, to_target
from bigain.errors import ConfigError
from bigain.tasks.adaptive import AdaptiveSchedule, average_precision, classify_image, image_noise
from bigain.tasks.base import DiffusionTask
from bigain.tasks.timing import ForwardTimer

__all__ = ["DiffusionClassifier", "TARGETS", "native_target"]

#: What classification measures the error on (the ``target`` option).
TARGETS = ("epsilon", "native", "auto")


def native_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction_type: str) -> torch.Tensor:
    """The ground truth a model of ``prediction_type`` is trained to output for the clean ``x0``, the
    noise ``eps`` (both ``[B, C, h, w]`` float32) and timesteps ``t`` ``[B]``: ``eps``, ``x0``, or
    ``v = sqrt(a) * eps - sqrt(1 - a) * x0`` with ``a = alphas_cumprod[t]`` (float64 maths). A
    backbone's own target is :meth:`bigain.backbones.DiffusionBackbone.native_target` (the velocity
    ``eps - x0`` for a flow-matching model)."""
    return to_target(x0, eps, t, alphas_cumprod, prediction_type)


class DiffusionClassifier(DiffusionTask):
    """Classify images with a (compressed) diffusion model, the Diffusion Classifier way.

    Args:
        backbone: registered backbone name: ``toy``, ``dit``, ``stable-diffusion``, ``pixart``.
        backbone_options: its options, e.g. ``{"path": "stabilityai/stable-diffusion-2-base", "dtype": "float16"}``.
        compressor: registered compressor name (``none``, ``tome``, ``bigain_tm``, ``todo``, ``bigain_td``, ``sito``).
        compressor_options: its hyperparameters, e.g. ``{"ratio": 0.7}``.
        max_downsample: UNet levels to compress (1 = full resolution only).
        blocks: DiT blocks to compress: ``paper`` (scaled paper selection), ``all``, or a list.
        n_samples: timesteps per adaptive stage (cumulative).
        to_keep: classes kept after each stage, ending at 1.
        n_trials: noise draws per timestep.
        loss: ``l2`` (the paper's), ``l1`` or ``huber``.
        target: what the error is measured on. ``epsilon`` (the paper's): the noise, whatever the
            model predicts (a v-, x0- or velocity prediction is converted to epsilon first).
            ``native``: the model's own prediction target, compared with its raw output - ``v =
            sqrt(a) * eps - sqrt(1 - a) * x0`` for ``v_prediction``, the clean latent ``x0`` for
            ``sample``, ``eps`` for ``epsilon`` (then the same as ``epsilon``), with ``a =
            alphas_cumprod[t]``; the velocity ``eps - x0`` for a flow-matching model (SD3).
            ``auto`` (the default): the backbone's choice, ``epsilon`` for the DDPM-trained models
            and ``native`` (the velocity) for flow-matching ones. Part of the result fingerprint
            when it resolves to ``native``.
        batch_size: (class, timestep) pairs per denoiser forward.
        seed: seeds the noise (with each image's dataset index) and the compressor.
        compile: run the compressed denoiser through ``torch.compile`` (``default``,
            ``reduce-overhead`` for CUDA graphs, ``max-autotune``) or eagerly (``none``). When
            compiled, every forward gets exactly ``batch_size`` pairs (the last batch of a stage is
            padded and the padding dropped), so one graph serves the whole run. Recorded in
            ``run.json``; not part of the result fingerprint.
    """

    def __init__(
        self,
        *,
        backbone: str = "toy",
        backbone_options: dict[str, Any] | None = None,
        compressor: str = "none",
        compressor_options: dict[str, Any] | None = None,
        max_downsample: int = 1,
        blocks: list[int] | Literal["paper", "all"] = "paper",
        n_samples: list[int] = [5, 20],  # noqa: B006 - shown as the default in configs and --help
        to_keep: list[int] = [5, 1],  # noqa: B006
        n_trials: int = 1,
        loss: Literal["l2", "l1", "huber"] = "l2",
        target: Literal["auto", "epsilon", "native"] = "auto",
        batch_size: int = 32,
        seed: int = 0,
        compile: CompileMode = "none",
    ) -> None:
        super().__init__(backbone=backbone, compressor=compressor, compressor_options=compressor_options)
        AdaptiveSchedule(tuple(n_samples), tuple(to_keep), 1000, n_trials)  # validated early
        if loss not in ("l2", "l1", "huber"):
            raise ConfigError(f"loss must be 'l2', 'l1' or 'huber', got {loss!r}")
        if target not in TARGETS:
            raise ConfigError(f"target must be 'epsilon' (rank classes on the noise error), 'native' (on the "
                              f"error of the model's own prediction target: v, x0, eps or a flow model's "
                              f"velocity) or 'auto' (the default: the backbone's choice), got {target!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        check_compile_mode(compile)
        self.save_hyperparameters()
        #: ``epsilon`` or ``native``: ``target`` with ``auto`` resolved by the backbone class.
        self.target = (target if target != "auto"
                       else str(getattr(self.backbone_class, "classification_target", "epsilon")))
        self.schedule: AdaptiveSchedule | None = None
        self._seen = 0
        self._correct = 0
        self.timer = ForwardTimer()  # the time inside the denoiser's forwards, per image

    # -- configuration ---------------------------------------------------------------------
    def result_config(self) -> dict[str, Any]:
        """The hyperparameters that change results (``batch_size`` and ``compile`` do not)."""
        hp = dict(self.hparams)
        hp.pop("batch_size", None)
        hp.pop("compile", None)
        hp["target"] = self.target
        if hp.get("target") == "epsilon":
            hp.pop("target")  # the default leaves earlier runs' identity unchanged
        return self.add_shared_identity(hp)

    def check_backbone(self, backbone: DiffusionBackbone) -> None:
        hp = self.hparams
        self.schedule = AdaptiveSchedule(tuple(hp.n_samples), tuple(hp.to_keep), backbone.num_train_timesteps,
                                         hp.n_trials)

    def on_predict_start(self) -> None:
        dm = self.prepare_predict("it provides the classes and prompts")
        self.num_classes = dm.num_classes
        self.multilabel = bool(getattr(dm, "multilabel", False))
        self.backbone.set_classes(prompts=dm.prompts, label_ids=dm.label_ids)

    # -- the work ------------------------------------------------------------------------------
    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        cond = self.backbone.class_conditions(classes)
        steps = self.backbone.timestep_input(t)  # the schedule indices as the model takes them
        if self.target == "native":
            return self.timer.call(self.backbone.predict_output, x_t, steps, cond)  # the model's raw output
        return self.timer.call(self.backbone.predict_noise, x_t, steps, cond)  # timed around the (compiled) call

    def _target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model's raw output is compared to with ``target: native``."""
        return self.backbone.native_target(x0, eps, t)

    def classify(self, image: torch.Tensor, index: int, label: Any) -> dict[str, Any]:
        """Classify one preprocessed image; returns its record."""
        hp = self.hparams
        start = time.perf_counter()
        self.timer.reset()
        x0 = self.backbone.encode(image.unsqueeze(0))[0]
        noise = image_noise(hp.seed, index, self.schedule, tuple(x0.shape))
        result = classify_image(x0, noise, schedule=self.schedule, num_classes=self.num_classes,
                                add_noise=self.backbone.add_noise, predict=self._predict,
                                loss=hp.loss, batch_size=hp.batch_size,
                                fixed_batch=hp.get("compile", "none") != "none",
                                target=self._target if self.target == "native" else None)
        if x0.is_cuda:
            torch.cuda.synchronize(x0.device)
        record: dict[str, Any] = {
            "index": int(index),
            "prediction": int(result.prediction),
            "top5": [int(c) for c in result.ranking[:5]],
            "mean_errors": {str(c): float(e) for c, e in result.mean_errors.items()},
            "evaluations": result.evaluations,
            "forward_calls": result.forward_calls,
            "seconds": time.perf_counter() - start,
            "denoiser_seconds": self.timer.seconds(),  # inside the denoiser's forwards only
        }
        if self.multilabel:
            labels = [int(v) for v in label]
            record["labels"] = labels
            record["correct"] = result.prediction in labels
            record["ranking"] = [int(c) for c in result.ranking]
            record["average_precision"] = average_precision(result.ranking, labels)
        else:
            record["label"] = int(label)
            record["correct"] = result.prediction == int(label)
        return record

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, list]:
        records = [self.classify(batch["image"][i], int(batch["index"][i]), batch["label"][i])
                   for i in range(len(batch["index"]))]
        self._seen += len(records)
        self._correct += sum(bool(r["correct"]) for r in records)
        return {"records": records, "bad": list(batch.get("bad", []))}

    @property
    def running_accuracy(self) -> float | None:
        return self._correct / self._seen if self._seen else None

    def progress_postfix(self) -> dict[str, str]:
        """Shown on the progress bar: images done and running accuracy (this rank)."""
        acc = self.running_accuracy
        return {"images": str(self._seen), "acc": "-" if acc is None else f"{acc:.3f}"}
