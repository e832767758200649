"""Merge run folders (or sweep folders holding them) into one report: every record in one
DataFrame keyed by (run, index); per run, accuracy with a 95% Wilson interval, the paired
difference against the baseline run on the same images with McNemar's exact p-value, FID / KID /
IS / CLIP score, measured speedup, GFLOPs and tokens kept. Writes summary.csv, summary.md,
summary.html, records.parquet and the speed/quality plots. Runs with different seeds or images are
never paired silently: the report says so.
"""

from __future__ import annotations

import argparse

from bigain.reporting import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--out", default=None, help="output folder (default: the first path's report/ folder)")
    parser.add_argument("--baseline", default="none", help="method every run is compared with (default none)")
    parser.add_argument("--title", default="bigain report")
    parser.add_argument("--spectrum", default=None, metavar="CSV",
                        help="add the frequency-retention table of `bigain visualize` (its spectrum.csv)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    result = write_report(args.paths, out, baseline=args.baseline, title=args.title, spectrum=args.spectrum)
    print(result["markdown"])
    print(f"written to {out}")
    return 0
