"""The main job: compare every compressor on both jobs - classification and generation - on the
two bundled toy models (a DiT and a UNet), with no GPU and no downloads, and write a report.

Compared: none; tome, bigain_tm and sito at ratios 0.5 and 0.7; todo and bigain_td at factor 2,
on the toy DiT (blocks 1-4 of 6 compressed) and the toy UNet (its full-resolution level, as on
Stable Diffusion); --backbones dit (or unet) runs one of them. Results go to --out (default
runs/demo): report.md (settings, what the numbers show, tables, plots, sample contact sheets),
report/ (summary.csv, summary.md, summary.html, plots), and one run folder per (task, backbone,
method). A second run reuses the finished cells; Ctrl-C stops the demo (exit
status 130) and the same command continues it. --quick runs a smaller version
(fewer images, a shorter protocol).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal

from bigain.backbones.base import COMPILE_MODES
from bigain.commands._parser import DTypeOrAuto, new_parser


def build_parser():
    parser = new_parser("demo", __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer images and a shorter protocol")
    parser.add_argument("--out", type=str, default="runs/demo", help="output folder")
    parser.add_argument("--images", type=int | None, default=None, help="classification images (default 100; quick 30)")
    parser.add_argument("--gen_per_class", type=int | None, default=None,
                        help="generated images per class (default 4; quick 2)")
    parser.add_argument("--methods", type=str, nargs="+", default=None, metavar="NAME",
                        help="only these compressors (plus none), e.g. --methods tome bigain_tm")
    parser.add_argument("--tasks", type=Literal["classify", "generate"], nargs="+", default=["classify", "generate"],
                        help="the jobs to run")
    parser.add_argument("--backbones", type=Literal["dit", "unet"], nargs="+", default=["dit", "unet"],
                        help="the toy denoisers to run: dit (the toy DiT), unet (the toy UNet) or both")
    parser.add_argument("--accelerator", type=str, default="auto", help="auto (a GPU when there is one), cpu, gpu")
    parser.add_argument("--dtype", type=DTypeOrAuto, default="auto",
                        help="precision the toy model runs in: auto, float32 (fp32), bfloat16 (bf16) or float16 "
                             "(fp16); auto: bfloat16 on a CPU that computes it natively (AMX / AVX-512 BF16 / ARM "
                             "BF16), float32 on other CPUs (where bfloat16 is emulated and several times slower) "
                             "and on a GPU; report.md says which and why. Noising and losses stay float32")
    parser.add_argument("--compile", type=Literal[COMPILE_MODES], default="none",
                        help="run the compressed toy model through torch.compile in this mode (none: eager); "
                             "finished runs are reused either way, the results do not depend on it")
    return parser


def run(args: Any) -> int:
    import pandas as pd
    from tqdm import tqdm

    from bigain.demo import demo_sweep, findings, write_demo_report
    from bigain.reporting import write_report
    from bigain.sweep import expand_sweep, run_sweep

    out = Path(args.out)
    why = "chosen with --dtype"
    args.dtype = str(args.dtype)
    if args.dtype == "auto":
        import torch

        from bigain.precision import auto_dtype

        on_gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
        args.dtype, why = auto_dtype("cuda" if on_gpu else "cpu")
    print(f"bigain demo: precision {args.dtype} ({why})", file=sys.stderr)
    spec = demo_sweep(out=out, quick=args.quick, images=args.images, gen_per_class=args.gen_per_class,
                      methods=args.methods, accelerator=args.accelerator, dtype=args.dtype, tasks=tuple(args.tasks),
                      compile=args.compile, backbones=tuple(args.backbones))
    cells = expand_sweep(spec)
    start = time.perf_counter()
    bar = tqdm(total=len(cells), desc="demo", unit="run", file=sys.stderr)

    def progress(done, total, cell, status) -> None:
        bar.set_postfix_str(f"{cell.task} {cell.method}: {status}")
        bar.update(1)

    result = run_sweep(spec, in_process=True, progress=progress)
    bar.close()
    for entry in result["cells"]:
        if entry["status"] == "failed":
            print(f"FAILED {entry['task']} {entry['method']}: {entry['error']} (log: {entry['log']})", file=sys.stderr)
    report = write_report([out / task for task in args.tasks if (out / task).exists()], out / "report",
                          title="bigain demo")
    cls = spec["classify"]["model"]
    reused = sum(entry["status"].startswith("skipped") for entry in result["cells"])
    models = {"dit": "bundled toy DiT (pixel space, 6 blocks, 256 tokens); compressed blocks: 1-4 (all but the "
                     "first and last; the paper's selection scaled to 6 blocks would be 1-2 only)",
              "unet": "bundled toy UNet (2x2 pixel patches, 256 tokens, one resolution level); compressed: "
                      "that level, so every self-attention layer (the paper's Stable Diffusion selection: the "
                      "full-resolution level)"}
    settings = {
        "models": "; ".join(models[b] for b in args.backbones),
        "classification": f"{spec['datasets'][0]['init_args']['length']} toy test images; adaptive protocol "
                          f"n_samples={cls['n_samples']}, to_keep={cls['to_keep']} (smaller than the paper's "
                          f"[5, 20] / [5, 1], to fit the time budget)",
        "generation": f"{spec['generate']['data']['init_args']['length']} images (one index per image, labels "
                      f"cycling through the 10 classes), DDIM {spec['generate']['model']['steps']} steps, "
                      f"guidance {spec['generate']['model']['guidance_scale']}; FID/KID on the toy classifier's "
                      f"features against the real toy images of the same indices",
        "device": ", ".join(sorted(report["summary"].get("device", pd.Series()).dropna().astype(str).unique())) or "-",
        "precision": f"{args.dtype} ({why})",
        "compile": "eager" if args.compile == "none" else f"torch.compile, mode {args.compile}",
        "wall time": f"{time.perf_counter() - start:.0f} s" + (f" ({reused} finished runs reused)" if reused else ""),
    }
    path = write_demo_report(out, report, settings)
    summary = report["summary"]
    print("\n".join(f"- {s}" for s in findings(summary, report["records"])))
    print()
    print(report["markdown"].split("\n", 2)[2] if report["markdown"].startswith("# ") else report["markdown"])
    print(f"report: {path}")
    return 1 if result["failed"] else 0
