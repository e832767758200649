"""Benchmark one denoiser forward under each compressor: median and spread of the latency, speedup
against `none` from the same run, GFLOPs, peak memory (CUDA), and tokens kept per level.

Models: sd2-unet, sdxl-unet, dit-xl-2 (256 or 512 with --resolution) and toy are built from
bundled diffusers configs with RANDOM weights (speed and FLOPs do not depend on weight values), or
give a real checkpoint with --model_path. Methods are `name[:key=value,...]`, e.g. `tome:ratio=0.7`
or `bigain_td:factor=2,alpha=0.5`; they run interleaved so their ratios are measured side by side.

`--compile none default` times every method eager and compiled (torch.compile) in the same
interleaved rounds; the first compiled call is reported as the compile time, never timed.

`--task classifier` instead reports the diffusion classifier's wall time against (denoiser calls x
the time of one forward at the same batch size): the classifier's own overhead.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, Literal

from bigain.bench import BENCH_MODELS, COMPILE_MODES, DEFAULT_METHODS, classifier_overhead, format_table, run_bench
from bigain.commands._parser import DType, new_parser
from bigain.errors import ConfigError

# bigain.bench's own spelling of each dtype
_BENCH_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def build_parser():
    parser = new_parser("bench", __doc__)
    parser.add_argument("--task", type=Literal["denoiser", "classifier"], default="denoiser",
                        help="what to time: one denoiser forward, or the diffusion classifier's overhead")
    parser.add_argument("--model", type=str, default="sd2-unet",
                        help=f"one of {', '.join(BENCH_MODELS)}; name:key=value,... overrides entries of its "
                             f"bundled config for a smaller variant (flux-dev:num_layers=2,num_single_layers=4)")
    parser.add_argument("--model_path", type=str | None, default=None,
                        help="a real checkpoint: hub id or local pipeline folder")
    parser.add_argument("--methods", type=str, nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help="methods to time, as name[:key=value,...]")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch_size", type=int | None, default=None,
                        help="denoiser: samples per forward (default 1); classifier: (class, timestep) pairs per "
                             "forward (default 32)")
    parser.add_argument("--dtype", type=DType, default="float32",
                        help="float32 (fp32), float16 (fp16) or bfloat16 (bf16)")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when there is a GPU, else cpu), "
                                                                   "cpu, cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per method (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per method first")
    parser.add_argument("--max_downsample", type=int, default=1, help="UNet levels to compress")
    parser.add_argument("--blocks", type=str, default="paper", help="DiT blocks: paper, all, or e.g. 1,2,3")
    parser.add_argument("--compare_tomesd", action="store_true", help="also time the tomesd package's patch")
    parser.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--compile", type=Literal[COMPILE_MODES], nargs="+", default=["none"], metavar="MODE",
                        help="time each method eager (none) and/or compiled with torch.compile in these modes, "
                             "side by side: none, default, reduce-overhead (CUDA graphs), max-autotune")
    parser.add_argument("--compile_backend", type=str, default="inductor", help="torch.compile backend")
    parser.add_argument("--freeze", action="store_true",
                        help="compile with inductor's freezing (weights as constants: folded, and prepacked for "
                             "oneDNN on a CPU); each compiled method then holds its own copy of the weights")
    parser.add_argument("--out", type=str | None, default=None,
                        help="folder for bench.csv / bench.md (default runs/bench/<time>)")
    parser.add_argument("--images", type=int, default=10, help="classifier task: images to classify")
    parser.add_argument("--compressor", type=str, default="none", help="classifier task: compressor")
    parser.add_argument("--backbone", type=str, default="toy",
                        help="classifier task: registered backbone (toy, dit, stable-diffusion); its checkpoint "
                             "from --model_path")
    return parser


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _blocks(text: str) -> str | list[int]:
    if text in ("paper", "all"):
        return text
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError as exc:
        raise ConfigError(f"--blocks must be paper, all or comma-separated block indices like 1,2,3; got {text!r}") \
            from exc


def run(args: Any) -> int:
    out = Path(args.out or Path("runs") / "bench" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "classifier":
        options = {"path": args.model_path} if args.model_path else None
        result = classifier_overhead(backbone=args.backbone, backbone_options=options, compressor=args.compressor,
                                     images=args.images, batch_size=args.batch_size or 32)
        (out / "classifier_overhead.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    blocks = _blocks(args.blocks)

    def progress(done: int, total: int) -> None:
        print(f"\rrepeat {done}/{total}", end="", file=sys.stderr, flush=True)

    print("Random weights: speed and FLOPs do not depend on weight values." if not args.model_path else
          f"Checkpoint: {args.model_path}", file=sys.stderr)
    df, info = run_bench(model=args.model, model_path=args.model_path, methods=args.methods,
                         resolution=args.resolution, batch_size=args.batch_size or 1,
                         dtype=_BENCH_DTYPE[str(args.dtype)], device=_device(args.device), repeats=args.repeats,
                         warmup=args.warmup,
                         max_downsample=args.max_downsample, blocks=blocks, compare_tomesd=args.compare_tomesd,
                         flops=not args.no_flops, compile_modes=args.compile,
                         compile_backend=args.compile_backend,
                         freeze=args.freeze, progress=progress)
    print(file=sys.stderr)
    info["dtype"] = str(args.dtype)  # recorded and printed in the one spelling every command uses
    if "dtype" in df:
        df["dtype"] = str(args.dtype)
    table = format_table(df, info)
    command = "bigain bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "bigain bench"
    df.to_csv(out / "bench.csv", index=False)
    (out / "bench.md").write_text(f"{table}\n\nCommand: `{command}`\n")
    (out / "bench.json").write_text(json.dumps(info, indent=2, default=str))
    print(table)
    print(f"\nwritten to {out}")
    return 0
