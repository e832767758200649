"""See what a compressor does: merge maps, frequency retention, side-by-side samples.

merge-maps  for one image, timestep and layer: which tokens each method keeps as destinations, which
            it merges or prunes and into what (coloured by cluster), and for the key/value methods the
            effective pooling kernel. One PNG per method and a grid comparing them
            (OUT/merge_maps/*.png, OUT/merge_maps/summary.csv).
spectrum    per layer and method, the 2D FFT over the token grid of the attention output with and
            without compression, in low / mid / high radial bands: energy retained and relative error
            per band (OUT/spectrum.csv, spectrum.md, spectrum.png, spectrum_layers.png).
edges       edge survival: for the merge and prune methods, the share of a layer's highest-Laplacian
            tokens (the top --edge_fraction by bigain_tm's score) that survive compression (stay kept
            tokens or destinations), per method and timestep (--timesteps), averaged over
            --num_images toy test images (OUT/edge_survival.csv, .md, .png).
samples     generation run folders side by side, one row per method, uncompressed first
            (OUT/samples.png).

The model is the bundled toy DiT (default; runs on CPU in seconds), the bundled toy UNet
(--model toy-unet), or a checkpoint given with --model_path (DiT, Stable Diffusion, PixArt, SD3,
...). Methods are `name[:key=value,...]`; --ratio and --factor fill in the methods that take
them. Example:

    bigain visualize --what all --index 3 --timestep 300 --runs runs/gen-none runs/gen-tome
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from bigain.commands._parser import DType, new_parser
from bigain.errors import ConfigError


def build_parser():
    from bigain.analysis.probe import DEFAULT_METHODS

    parser = new_parser("visualize", __doc__)
    from bigain.analysis.edge_survival import EDGE_METHODS

    parser.add_argument("--what", type=Literal["merge-maps", "spectrum", "edges", "samples", "all"], default="all",
                        help="which figures to draw (samples only when --runs is given)")
    parser.add_argument("--model", type=str, default="toy",
                        help="toy (the bundled toy DiT), toy-unet (the bundled toy UNet), or the registered backbone "
                             "of --model_path: dit, stable-diffusion, pixart, sd3, ... (detected from the folder if "
                             "toy)")
    parser.add_argument("--model_path", type=str | None, default=None,
                        help="a checkpoint folder or hub id")
    parser.add_argument("--dtype", type=DType, default="float32",
                        help="float32 (fp32), float16 (fp16) or bfloat16 (bf16)")
    parser.add_argument("--device", type=str, default="cpu", help="where to run the model")
    parser.add_argument("--methods", type=str, nargs="+", default=None, metavar="METHOD",
                        help=f"methods as name[:key=value,...] (default: {' '.join(DEFAULT_METHODS)}; "
                             f"edges: {' '.join(EDGE_METHODS)})")
    parser.add_argument("--ratio", type=float, default=0.5, help="ratio of the merge/prune methods")
    parser.add_argument("--factor", type=int, default=2, help="factor of the key/value methods")
    parser.add_argument("--layer", type=int | None, default=None,
                        help="merge maps: layer index (default: the first layer the default application compresses)")
    parser.add_argument("--layers", type=str, default="all", help="spectrum: layer indices, e.g. 1,2,3, or all")
    parser.add_argument("--spectrum_mode", type=Literal["isolated", "joint"], default="isolated",
                        help="spectrum: compress one layer at a time (isolated) or all --layers at once (joint)")
    parser.add_argument("--timestep", type=int, default=500, help="diffusion timestep (merge maps, spectrum)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 500, 900], metavar="T",
                        help="edges: diffusion timesteps")
    parser.add_argument("--edge_fraction", type=float, default=0.1,
                        help="edges: the top fraction q of tokens by Laplacian score counted as edge tokens")
    parser.add_argument("--num_images", type=int, default=4,
                        help="edges: toy test images --index, --index + 1, ... (not with --image: that one image)")
    parser.add_argument("--index", type=int | None, default=None,
                        help="toy test image index (default 0; not with --image)")
    parser.add_argument("--image", type=str | None, default=None, help="an image file instead of a toy test image")
    parser.add_argument("--label", type=int | None, default=None,
                        help="class id to condition on (default: the toy image's label, or 0)")
    parser.add_argument("--prompt", type=str | None, default=None,
                        help="prompt to condition a text model on (default: the toy image's class prompt, or empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of the compressors")
    parser.add_argument("--runs", type=str, nargs="+", default=None, metavar="RUN_DIR",
                        help="samples: generation run folders")
    parser.add_argument("--sample_indices", type=int, nargs="+", default=None, metavar="INDEX",
                        help="samples: image indices to show (default: the first --max_samples shared ones)")
    parser.add_argument("--max_samples", type=int, default=8, help="samples: columns at most")
    parser.add_argument("--out", type=str, default="runs/visualize", help="output folder")
    return parser


def _layers(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise ConfigError(f"--layers must be 'all' or comma-separated layer indices like 1,2,3; got {text!r}") from exc


def run(args: Any) -> int:
    from bigain.analysis.probe import (
        DEFAULT_METHODS,
        load_backbone,
        load_image,
        parse_methods,
        probe_backbone,
        toy_image,
    )

    if args.index is not None and args.image is not None:
        raise ConfigError("give --index (a toy test image) or --image (an image file), not both")
    index = 0 if args.index is None else args.index
    out = Path(args.out)
    want = {"merge-maps", "spectrum", "edges", "samples"} if args.what == "all" else {args.what}
    if args.what == "samples" and not args.runs:
        raise ConfigError("--what samples needs --runs RUN_DIR [RUN_DIR ...]: generation run folders "
                          "(each with run.json and images/)")
    written: list[Path] = []
    if args.num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {args.num_images}")
    if want & {"merge-maps", "spectrum", "edges"}:
        methods = parse_methods(args.methods or DEFAULT_METHODS, ratio=args.ratio, factor=args.factor)
        layers = _layers(args.layers)
        if args.image is not None:
            image, label, prompt = load_image(args.image), 0, ""
        else:
            image, label, prompt = toy_image(index)
        backbone = load_backbone(model=args.model, path=args.model_path, dtype=str(args.dtype), device=args.device)
        probe = probe_backbone(backbone, image, timestep=args.timestep,
                               label=label if args.label is None else args.label,
                               prompt=prompt if args.prompt is None else args.prompt, seed=args.seed)
        source = Path(args.image).name if args.image is not None else f"toy test image {index}"
        probe.description = f"{probe.description}, {source}"
        if "merge-maps" in want:
            from bigain.analysis.merge_maps import write_merge_maps

            result = write_merge_maps(probe, methods, out, layer=args.layer, seed=args.seed)
            written += result["files"]
            cols = ["label", "kind", "tokens", "queries", "keys_values", "destinations", "merged", "pruned"]
            print(result["summary"][cols].to_string(index=False))
        if "spectrum" in want:
            from bigain.analysis.spectrum import write_spectrum

            result = write_spectrum(probe, methods, out, layers=layers, mode=args.spectrum_mode, seed=args.seed)
            written += result["files"]
            print(result["markdown"])
        if "edges" in want:
            from bigain.analysis.edge_survival import EDGE_METHODS, num_edge_tokens, write_edge_survival

            num_edge_tokens(1, args.edge_fraction)  # validated before the work
            edge_methods = parse_methods(args.methods or EDGE_METHODS, ratio=args.ratio, factor=args.factor)
            if args.image is not None:
                images = [(image, label, prompt, source)]
            else:
                images = [(*toy_image(i), f"toy test image {i}") for i in range(index, index + args.num_images)]
            if args.label is not None or args.prompt is not None:
                images = [(im, lab if args.label is None else args.label, pr if args.prompt is None else args.prompt,
                           name) for im, lab, pr, name in images]
            result = write_edge_survival(backbone, images, edge_methods, out, timesteps=args.timesteps,
                                         q=args.edge_fraction, layer=args.layer, seed=args.seed)
            written += result["files"]
            print(result["markdown"])
            for name in result["skipped"]:
                print(f"edges: left out {name}")
    if "samples" in want:
        if args.runs:
            from bigain.analysis.samples import write_samples

            written += write_samples(args.runs, out, indices=args.sample_indices, max_images=args.max_samples)["files"]
        else:
            print("samples: skipped (give --runs RUN_DIR ... to draw generation runs side by side)")
    for path in written:
        print(f"wrote {path}")
    return 0
