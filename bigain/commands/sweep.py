"""Run a grid of compressors x hyperparameters x tasks x datasets, one run folder per cell, then
write the report of the whole sweep. Finished cells are skipped; a failing cell is recorded with
its error (sweep.json, and the cell's log.txt) and the others go on. Ctrl-C (SIGINT) or SIGTERM
stops the sweep, exit status 130 / 143: the running cell keeps what it finished and is recorded as
interrupted, no later cell starts, and the same command resumes. See bigain.sweep for the file
format; configs/sweep-toy.yaml is an example.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigain.reporting import write_report
from bigain.sweep import expand_sweep, load_sweep, run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the sweep YAML file")
    parser.add_argument("--out", default=None, help="sweep folder (overrides the file's out:)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--in-process", action="store_true",
                        help="run cells in this process (faster start; the default runs each in a subprocess)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    spec = load_sweep(args.config)
    cells = expand_sweep(spec, args.out)
    if args.dry_run:
        for cell in cells:
            print(f"{cell.task:9s} {cell.dataset:12s} {cell.method:32s} {cell.folder}")
        return 0
    bar = tqdm(total=len(cells), desc="sweep", unit="cell", file=sys.stderr)

    def progress(done: int, total: int, cell, status: str) -> None:
        bar.set_postfix_str(f"{cell.task}/{cell.method}: {status}")
        bar.update(1)

    result = run_sweep(spec, out=args.out, in_process=args.in_process, progress=progress)
    bar.close()
    root = Path(args.out or spec.get("out") or "runs/sweep")
    for entry in result["cells"]:
        if entry["status"] == "failed":
            print(f"FAILED {entry['task']}/{entry['dataset']}/{entry['method']}: {entry['error']} "
                  f"(log: {entry['log']})", file=sys.stderr)
    if not args.no_report and any(e["status"] != "failed" for e in result["cells"]):
        report = write_report([root], root / "report", title=f"Sweep {root.name}")
        print(report["markdown"])
    print(f"{result['total']} cells, {result['failed']} failed; sweep folder {root}")
    return 1 if result["failed"] else 0
