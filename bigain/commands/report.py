"""Merge run folders (or sweep folders holding them) into one report: every record in one
DataFrame keyed by (run, index); per run, accuracy with a 95% Wilson interval, the paired
difference against the baseline run on the same images with its paired interval and McNemar's
exact p-value (raw and Holm-adjusted), FID / KID / IS / CLIP score, the speed-up from the
denoiser's timed forwards (the wall clock beside it), GFLOPs and tokens kept. Writes summary.csv,
summary.md, summary.html, records.parquet and the speed/quality plots. Runs with different seeds or images are
never paired silently: the report says so. --pool_seeds adds pooled.csv / pooled.md: classification
runs that differ only in their seed pooled into one row, compared on every (seed, image) pair with
the baseline and with each method's reference (bigain_tm with tome, bigain_td with todo), Holm-adjusted.
"""

from __future__ import annotations

from typing import Any

from bigain.commands._parser import new_parser


def build_parser():
    parser = new_parser("report", __doc__)
    parser.add_argument("paths", type=str, nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="run folders, or sweep folders holding them")
    parser.add_argument("--out", type=str | None, default=None,
                        help="output folder (default: the first path's report/ folder)")
    parser.add_argument("--baseline", type=str, default="none", help="method every run is compared with")
    parser.add_argument("--title", type=str, default="bigain report", help="the report's title")
    parser.add_argument("--spectrum", type=str | None, default=None, metavar="CSV",
                        help="add the frequency-retention table of `bigain visualize` (its spectrum.csv)")
    parser.add_argument("--pool_seeds", action="store_true",
                        help="also write pooled.csv / pooled.md: classification runs pooled over their seeds, "
                             "with paired tests against the baseline and each method's reference")
    return parser


def run(cfg: Any) -> int:
    from pathlib import Path

    from bigain.reporting import write_report

    paths = [str(p) for p in cfg.paths]
    out = Path(cfg.out) if cfg.out else Path(paths[0]) / "report"
    result = write_report(paths, out, baseline=cfg.baseline, title=cfg.title, spectrum=cfg.spectrum)
    print(result["markdown"])
    if cfg.pool_seeds:
        from bigain.analysis.study import pool_seeds, pooled_markdown
        from bigain.reporting import load_runs

        pooled = pool_seeds(*load_runs(paths), baseline=cfg.baseline)
        pooled.to_csv(out / "pooled.csv", index=False)
        text = "# Pooled over seeds\n\n" + pooled_markdown(pooled) + "\n"
        (out / "pooled.md").write_text(text)
        print(text)
    print(f"written to {out}")
    return 0
