"""Run a grid of compressors x hyperparameters x tasks x datasets, one run folder per cell, then
write the report of the whole sweep. Finished cells are skipped; a failing cell is recorded with
its error (sweep.json, and the cell's log.txt) and the others go on. Ctrl-C (SIGINT) or SIGTERM
stops the sweep, exit status 130 / 143: the running cell keeps what it finished and is recorded as
interrupted, no later cell starts, and the same command resumes.

The sweep file is this command's --config: its keys (out, tasks, datasets, compressors, classify,
generate) are the options below, so any of them can be overridden by a flag, e.g.
`bigain sweep --config configs/sweep-toy.yaml --out runs/other --classify.trainer '{devices: 2}'`,
and --print_config shows the sweep as it will run. configs/sweep-toy.yaml is an example; see
bigain.sweep for the format.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from bigain.commands._parser import new_parser
from bigain.errors import ConfigError

_TASK_SECTIONS = ("model", "data", "trainer")


def build_parser():
    parser = new_parser("sweep", __doc__)
    parser.add_argument("--out", type=str, default="runs/sweep", help="the sweep folder")
    parser.add_argument("--tasks", type=list[Literal["classify", "generate"]], default=["classify"],
                        help="the tasks every cell runs")
    parser.add_argument("--datasets", type=list[str | dict[str, Any]], default=["toy"],
                        help="datamodules: a registered name, or {class_path:, init_args:, label:}")
    parser.add_argument("--compressors", type=list[str | dict[str, Any]], default=["none"],
                        help="compressors: a name, or {name:, options: {...}, grid: {option: [values]}}")
    parser.add_argument("--backbones", type=list[dict[str, Any]] | None, default=None,
                        help="optional: run every cell on each of these models, {label:, model: {backbone: ..., "
                             "...}} laid over the tasks' model sections (cells in <task>/<dataset>/<label>/)")
    for task in ("classify", "generate"):
        for section in _TASK_SECTIONS:
            note = "; its init_args override each dataset's" if section == "data" else ""
            parser.add_argument(f"--{task}.{section}", type=dict[str, Any] | None, default=None,
                                help=f"the {section} section of every {task} cell, as in a `bigain {task}` "
                                     f"config{note}")
        parser.add_argument(f"--{task}.seed_everything", type=bool | int | None, default=None,
                            help=f"seed_everything of every {task} cell")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and exit")
    parser.add_argument("--in_process", action="store_true",
                        help="run cells in this process (faster start; the default runs each in a subprocess)")
    parser.add_argument("--no_report", action="store_true", help="do not write the report at the end")
    return parser


def sweep_spec(cfg: Any) -> dict[str, Any]:
    """The sweep specification (as :func:`bigain.sweep.run_sweep` takes it) from the parsed options."""
    spec: dict[str, Any] = {"out": cfg.out, "tasks": list(cfg.tasks), "datasets": list(cfg.datasets),
                            "compressors": list(cfg.compressors)}
    if cfg.backbones:
        spec["backbones"] = list(cfg.backbones)
    for task in ("classify", "generate"):
        section = {k: v for k, v in vars(cfg[task]).items() if v is not None}
        if section:
            spec[task] = section
    return spec


def run(cfg: Any) -> int:
    from tqdm import tqdm

    from bigain.reporting import write_report
    from bigain.sweep import expand_sweep, run_sweep

    if not cfg.config:
        raise ConfigError("give the sweep file with --config FILE (configs/sweep-toy.yaml is an example); "
                          "--print_config shows every option it may hold")
    spec = sweep_spec(cfg)
    cells = expand_sweep(spec)
    if cfg.dry_run:
        for cell in cells:
            print(f"{cell.task:9s} {cell.dataset:12s} {cell.backbone or '-':10s} {cell.method:32s} {cell.folder}")
        return 0
    bar = tqdm(total=len(cells), desc="sweep", unit="cell", file=sys.stderr)

    def progress(done: int, total: int, cell, status: str) -> None:
        bar.set_postfix_str(f"{cell.task}/{cell.method}: {status}")
        bar.update(1)

    result = run_sweep(spec, in_process=cfg.in_process, progress=progress)
    bar.close()
    root = Path(spec["out"])
    for entry in result["cells"]:
        if entry["status"] == "failed":
            print(f"FAILED {entry['task']}/{entry['dataset']}/{entry['method']}: {entry['error']} "
                  f"(log: {entry['log']})", file=sys.stderr)
    if not cfg.no_report and any(e["status"] != "failed" for e in result["cells"]):
        report = write_report([root], root / "report", title=f"Sweep {root.name}")
        print(report["markdown"])
    print(f"{result['total']} cells, {result['failed']} failed; sweep folder {root}")
    return 1 if result["failed"] else 0
