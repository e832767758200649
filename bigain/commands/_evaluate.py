"""What ``bigain classify`` and ``bigain generate`` share: the LightningCLI, the run folder,
resume, per-rank writing and the final merge."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from bigain.datamodules.base import BigainDataModule
from bigain.datamodules.registry import datamodule_class_path
from bigain.errors import BigainError, ConfigError
from bigain.interrupts import Interrupted, forward_to, handle_signals, reinstall, requested
from bigain.precision import canonical_dtype
from bigain.runs import RankWatcher, RecordWriter, RunFolder, dead_rank_status, environment_info

__all__ = ["run_evaluation", "EvalProgressBar", "translate_names", "model_meta"]

# Options of a datamodule that never change results (left out of the run's fingerprint).
_NON_RESULT_DATA = {"batch_size", "num_workers", "pin_memory", "on_bad_image"}


class EvalProgressBar(TQDMProgressBar):
    """Lightning's bar, plus what the module reports (images done, running accuracy)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        bar = self.predict_progress_bar
        postfix = getattr(pl_module, "progress_postfix", None)
        if bar is not None and postfix is not None:
            bar.set_postfix(postfix(), refresh=False)


# flags whose value translate_names rewrites (the value follows the flag, or `=` joins them)
_NAMED_FLAGS = ("--data", "--data.class_path", "--data.help", "--config", "-c", "--model.backbone_options")


def translate_names(argv: Sequence[str]) -> list[str]:
    """Let a datamodule be named by its registered name wherever LightningCLI takes a class path
    (``--data toy``, ``--data.help toy``, ``data: toy`` / ``data: {class_path: toy}`` in a config
    file, with ``--config FILE`` or ``--config=FILE``), and a backbone's dtype in any spelling
    (``backbone_options: {dtype: bf16}`` -> ``bfloat16``). Config files are passed on as YAML text."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag not in _NAMED_FLAGS or (not eq and i + 1 >= len(args)):
            out.append(args[i])
            i += 1
            continue
        if not eq:
            value = args[i + 1]
        i += 1 if eq else 2
        if flag in ("--config", "-c"):
            out += [flag, _translate_config(Path(value)) if Path(value).is_file() else value]
        elif flag == "--model.backbone_options":
            out += [flag, _canonical_options(value)]
        else:
            out += [flag, datamodule_class_path(value)]
    return out


def _translate_config(path: Path) -> str:
    text = path.read_text()
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BigainError(f"config file {path} is not valid YAML: {exc}") from exc
    if cfg is None:
        raise ConfigError(f"config file {path} is empty; give it model, data and trainer sections (like "
                          f"configs/classify-toy.yaml), or leave --config out")
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, trainer, ...), "
                          f"not a {type(cfg).__name__}")
    model = cfg.get("model")
    options = model.get("backbone_options") if isinstance(model, dict) else None
    if isinstance(options, dict) and isinstance(options.get("dtype"), str):
        options["dtype"] = canonical_dtype(options["dtype"])
    data = cfg.get("data")
    if isinstance(data, str):
        cfg["data"] = {"class_path": datamodule_class_path(data)}
    elif isinstance(data, dict) and isinstance(data.get("class_path"), str):
        data["class_path"] = datamodule_class_path(data["class_path"])
    return yaml.safe_dump(cfg, sort_keys=False)


def _canonical_options(text: str) -> str:
    try:
        options = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # LightningCLI reports it
    if not (isinstance(options, dict) and isinstance(options.get("dtype"), str)):
        return text
    options["dtype"] = canonical_dtype(options["dtype"])
    return json.dumps(options)


def model_meta(run: RunFolder, model: Any, dm: BigainDataModule) -> dict[str, Any]:
    """What ``run.json`` records about the model and its compression (measured on rank 0)."""
    from bigain.bench import denoiser_gflops
    from bigain.registry import COMPRESSORS

    previous = (run.read_meta() or {}).get("compression", {})
    compression = {"layers": model.handle.layers, "skipped": model.handle.skipped,
                   # a run with nothing left to do keeps the earlier measurement
                   "tokens_kept": model.handle.tokens_kept() or previous.get("tokens_kept", {})}
    compression["gflops_per_forward"] = denoiser_gflops(model.backbone, int(dm.image_size))
    from bigain.datamodules.registry import DATAMODULES

    # the compressor's and the datamodule's origin: distribution and version, or for a local plugin
    # named by import path (package.module:ClassName) its module file and the file's sha256
    return {"model": model.backbone.describe(), "compression": compression,
            "plugin": COMPRESSORS.describe(model.hparams.compressor),
            "datamodule_plugin": DATAMODULES.describe_class(type(dm))}


#: The Trainer options ``--help`` shows (the ones that matter for evaluation); ``--help_all`` shows every one.
EVAL_TRAINER_OPTIONS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "limit_predict_batches",
                        "enable_progress_bar")


class _HelpAll(argparse.Action):
    """``--help_all``: the help with every option, the whole Lightning Trainer list included."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.print_help()
        parser.exit()


def _evaluation_help(parser: LightningArgumentParser) -> None:
    """Make ``--help`` lead with what matters for evaluation: the run folder, the model and the data
    first, then only the Trainer options of :data:`EVAL_TRAINER_OPTIONS` (the others stay accepted)."""
    keep = {"--trainer", *(f"--trainer.{name}" for name in EVAL_TRAINER_OPTIONS)}
    hidden = 0
    for action in parser._actions:
        trainer = [o for o in action.option_strings if o.startswith("--trainer")]
        if trainer and not keep & set(action.option_strings):
            action.help = argparse.SUPPRESS
            hidden += not trainer[0].endswith(".help")
    for group in parser._action_groups:
        if any(a.dest.startswith("trainer.") for a in group._group_actions):
            parser._action_groups.remove(group)
            parser._action_groups.append(group)  # after the model and the data
            group.title = "Lightning Trainer (the options that matter for evaluation)"
            group.description = (f"{hidden} more --trainer.* options (training-only ones among them) are accepted "
                                 f"too and listed by --help_all.")
            break
    parser._actions.sort(key=lambda a: any(o.startswith("--trainer") for o in a.option_strings))  # usage order


class _EvalCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default=None,
                            help="run folder (default: runs/<task>/<compressor>-<timestamp>)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="delete the results a run folder holds and start again")
        parser.add_argument("--resume", type=bool, default=False,
                            help="keep the results of a run folder even if its configuration differs")
        parser.add_argument("--help_all", action=_HelpAll,
                            help="show the help with every option, all the Lightning Trainer ones included, and exit")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, list) and {"-h", "--help"} & set(args) and "--help_all" not in args:
            _evaluation_help(parser)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        options = self.config.model.get("backbone_options")
        if isinstance(options, dict) and isinstance(options.get("dtype"), str):  # e.g. --model CONFIG files
            options["dtype"] = canonical_dtype(options["dtype"])


def _data_result_config(cfg_data: Any) -> dict[str, Any]:
    data = cfg_data.as_dict() if hasattr(cfg_data, "as_dict") else dict(cfg_data)
    init = {k: v for k, v in (data.get("init_args") or {}).items() if k not in _NON_RESULT_DATA}
    return {"class_path": data.get("class_path"), "init_args": init}


def _build_cli(model_class: type, argv: list[str], task: str, description: str) -> _EvalCLI:
    return _EvalCLI(
        model_class,
        BigainDataModule,
        subclass_mode_data=True,
        run=False,
        args=argv,
        save_config_callback=None,
        seed_everything_default=False,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
        trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                          "devices": 1, "accelerator": "auto"},
        parser_kwargs={"prog": f"bigain {task}", "description": description, "default_env": False},
    )


def run_evaluation(
    argv: Sequence[str] | None,
    *,
    task: str,
    model_class: type,
    finalize: Callable[[RunFolder, Any, BigainDataModule, Any], dict[str, Any]],
    description: str,
) -> int:
    """Parse the config, claim the run folder, predict with per-rank writers, merge on rank 0."""
    argv = translate_names(sys.argv[2:] if argv is None else argv)
    with warnings.catch_warnings():  # we pass args= on purpose (the dispatcher owns sys.argv)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _build_cli(model_class, argv, task, description)
    cfg, model, dm, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    run_dir = cfg.run_dir or str(Path("runs") / task / (
        f"{cfg.model.compressor}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"))
    run = RunFolder(run_dir)
    result_config = {"task": task, "model": model.result_config(), "data": _data_result_config(cfg.data),
                     "precision": str(trainer.precision)}  # as Lightning resolved it (16-mixed on a CPU is bf16)
    created = not run.path.exists()
    with handle_signals():
        run.prepare(task=task, result_config=result_config, full_config=cli.parser.dump(cfg, skip_none=False),
                    overwrite=cfg.overwrite, resume=cfg.resume)
        try:
            return _predict_and_merge(run, cfg, model, dm, trainer, task, finalize)
        except BaseException as exc:
            if trainer.is_global_zero:
                _record_failure(run, exc, trainer, created=created)
            raise
        finally:
            run.release()


def _predict_and_merge(run: RunFolder, cfg: Any, model: Any, dm: BigainDataModule, trainer: Any, task: str,
                       finalize: Callable[[RunFolder, Any, BigainDataModule, Any], dict[str, Any]]) -> int:
    done = set() if cfg.overwrite else run.done_indices()
    dm.skip_indices(done)
    trainer.callbacks = [EvalProgressBar() if isinstance(cb, ProgressBar) else cb for cb in trainer.callbacks]
    trainer.callbacks += [RecordWriter(run), _SignalGuard()]
    dm.setup("predict")
    with RankWatcher(run) as ranks, forward_to(ranks.pids):
        if len(dm.dataset):  # every rank sees the same remaining indices; none left: just merge
            trainer.predict(model, datamodule=dm, return_predictions=False)
        else:
            model.configure_model()
        trainer.strategy.barrier()
    if trainer.is_global_zero:
        summary = finalize(run, model, dm, trainer)
        bad = run.bad_images()
        run.update_meta(status="complete", finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        **environment_info(trainer), data=dm.describe(), summary=summary, bad_images=bad)
        print(f"bigain {task}: {run.path}")
        for key, value in summary.items():
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        if bad:
            print(f"  skipped images: {len(bad)} (listed in {run.path / 'summary.md'})")
    return 0


class _SignalGuard(Callback):
    """Puts bigain's SIGINT/SIGTERM handlers back once Lightning has installed its own (which only
    note a SIGTERM and let the predict loop go on)."""

    def on_predict_start(self, trainer, pl_module) -> None:
        reinstall()


def _wait_for_ranks(trainer: Any, timeout: float = 30.0) -> None:
    import subprocess

    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def _record_failure(run: RunFolder, exc: BaseException, trainer: Any, *, created: bool) -> None:
    """Rank 0, when a run ends early: ``interrupted`` for a signal, ``failed`` for an error. A run folder
    this start created and that holds no record is removed, so it never stands in the way."""
    signum = exc.signum if isinstance(exc, Interrupted) else requested()
    if signum is not None:
        _wait_for_ranks(trainer)  # they got the signal too; let them finish their last append
        name = Interrupted(signum).name
        run.update_meta(status=f"interrupted ({name}): start the same command to resume",
                        finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        return
    if created and not run.has_results():
        import shutil

        shutil.rmtree(run.path, ignore_errors=True)
        return
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    status = dead_rank_status(procs) or f"failed: {type(exc).__name__}: {exc}"  # a dead rank is the cause
    for proc in procs:  # ranks still running would wait forever for the ones that are gone
        if proc.poll() is None:
            proc.kill()
    run.update_meta(status=status, finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
