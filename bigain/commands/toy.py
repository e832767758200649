"""Train, evaluate and document the bundled toy models.

  bigain toy train [--out DIR]        train the toy classifier (a few minutes), the toy DiT and the toy
                                      UNet (each about an hour on 2 cores of a CPU that computes bfloat16
                                      natively, three to four times longer in float32 on one that does
                                      not) into DIR (default runs/toy-train), then evaluate them and
                                      write DIR/MODEL_CARD.md;
                                      --classifier_steps 0 keeps the classifier already in DIR,
                                      --denoisers dit (or unet) trains one denoiser only;
                                      stopped (Ctrl-C), the same command resumes where it stopped
  bigain toy evaluate [--assets DIR]  measure the models in DIR again and rewrite its MODEL_CARD.md
                                      (default: the bundled models, in the package's assets folder)

The models bigain ships (what `bigain demo` and the `toy` backbone load) are in the package's assets
folder; training never writes there. To use models you trained, point the toy backbones at them:
`--model.backbone toy --model.backbone_options '{path: DIR/toy-dit}'` or `--model.backbone toy-unet
--model.backbone_options '{path: DIR/toy-unet}'` (and `toy:DIR/classifier.safetensors` as feature
extractor or fidelity classifier). `bigain toy train --help` lists the options of each action.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal

from bigain.commands._parser import DTypeOrAuto, new_parser, undeprecate
from bigain.errors import BigainError
from bigain.toy.evaluate import ASSETS

#: Where ``bigain toy train`` writes unless told otherwise (relative to the working directory).
DEFAULT_TRAIN_DIR = "runs/toy-train"


def _evaluation_options(parser) -> None:
    parser.add_argument("--images", type=int, default=500, help="test images for the diffusion-classifier accuracy")
    parser.add_argument("--fidelity_per_class", type=int, default=20, help="generated samples per class")
    parser.add_argument("--dtype", type=DTypeOrAuto, default="auto",
                        help="precision of the evaluation forwards: float32 (fp32), bfloat16 (bf16), float16 "
                             "(fp16) or auto: bfloat16 on a CPU that computes it natively (AMX or AVX-512 BF16), "
                             "float32 elsewhere (emulated bfloat16 is many times slower)")


def build_parser():
    parser = new_parser("toy", __doc__)
    actions = parser.add_subcommands(dest="action")
    train = new_parser("toy train", "Train the toy classifier, the toy DiT and the toy UNet into --out, then "
                                    "evaluate them and write MODEL_CARD.md there.")
    train.add_argument("--out", type=str, default=DEFAULT_TRAIN_DIR,
                       help="the folder the models, training logs and model card are written to")
    train.add_argument("--denoisers", type=Literal["dit", "unet"], nargs="+", default=["dit", "unet"],
                       help="the toy denoisers to train: dit, unet or both")
    train.add_argument("--steps", type=int, default=9000, help="DiT training steps")
    train.add_argument("--unet_steps", type=int, default=4500, help="UNet training steps")
    train.add_argument("--unet_lr", type=float, default=1e-3, help="UNet peak learning rate (cosine schedule)")
    train.add_argument("--unet_ema_decay", type=float, default=0.999,
                       help="decay of the UNet's weight average (bias-corrected for the starting weights)")
    train.add_argument("--unet_init_from", type=str | None, default=None, metavar="DIR",
                       help="continue training from a saved toy UNet folder (holding unet/ and "
                            "class_prompts.safetensors) instead of starting from scratch, with a 20-step "
                            "learning-rate warm-up instead of 50")
    train.add_argument("--batch_size", type=int, default=32, help="training batch size of both denoisers")
    train.add_argument("--train_dtype", type=DTypeOrAuto, default="auto",
                       help="precision of the denoisers' training: bfloat16 (autocast), float32, or auto: bfloat16 "
                            "on a CPU that computes it natively, float32 elsewhere; the bundled models were trained "
                            "in bfloat16")
    train.add_argument("--checkpoint_every", type=int, default=250,
                       help="denoiser steps between saves of the whole training state (a stopped run also saves "
                            "it); the same command resumes from it")
    train.add_argument("--classifier_steps", type=int, default=600,
                       help="classifier training steps; 0 keeps the classifier already in --out")
    train.add_argument("--seed", type=int, default=0, help="seed of training and evaluation")
    train.add_argument("--loss_weighting", type=Literal["min_snr", "p2", "none"], default="min_snr",
                       help="weighting of the denoisers' epsilon loss over noise levels: min-SNR-5, P2 (favours "
                            "the high-noise steps where shapes form) or none")
    train.add_argument("--init_from", type=str | None, default=None, metavar="DIR",
                       help="continue training from a saved toy DiT folder (holding transformer/) instead of "
                            "starting from scratch")
    _evaluation_options(train)
    train.add_argument("--no_eval", action="store_true", help="train only (no metrics, no model card)")
    evaluate = new_parser("toy evaluate", "Measure the toy models in --assets again and rewrite the "
                                          "MODEL_CARD.md and metrics.json there.")
    evaluate.add_argument("--assets", type=str | None, default=None,
                          help="the models folder (default null: the bundled models, in the package's assets folder)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the evaluation")
    evaluate.add_argument("--denoisers", type=Literal["dit", "unet"], nargs="+", default=["dit", "unet"],
                          help="the toy denoisers to measure again; the others keep the numbers metrics.json holds")
    _evaluation_options(evaluate)
    actions.add_subcommand("train", train, help="train the toy models into --out (default runs/toy-train)")
    actions.add_subcommand("evaluate", evaluate, help="measure the models in --assets again, rewrite MODEL_CARD.md")
    return parser


def _train_command(args: Any) -> str:
    """The command line that reproduces a training run (recorded in metrics.json and the card)."""
    denoisers = "" if sorted(args.denoisers) == ["dit", "unet"] else " --denoisers " + " ".join(args.denoisers)
    return ("bigain toy train" + (f" --out {args.out}" if args.out != DEFAULT_TRAIN_DIR else "") + denoisers
            + (f" --steps {args.steps}" if "dit" in args.denoisers else "")
            + (f" --unet_steps {args.unet_steps}" if "unet" in args.denoisers else "")
            + (f" --unet_lr {args.unet_lr:g} --unet_ema_decay {args.unet_ema_decay:g}"
               if "unet" in args.denoisers and (args.unet_lr, args.unet_ema_decay) != (1e-3, 0.999) else "")
            + (f" --unet_init_from {args.unet_init_from}" if "unet" in args.denoisers and args.unet_init_from else "")
            + f" --batch_size {args.batch_size} --train_dtype {args.train_dtype}"
            + f" --classifier_steps {args.classifier_steps}"
            + f" --loss_weighting {args.loss_weighting} --seed {args.seed}")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cfg: Any) -> int:
    from bigain.precision import auto_dtype
    from bigain.toy.evaluate import class_fidelity, classifier_accuracy, diffusion_classifier_accuracy, write_model_card
    from bigain.toy.train import train_toy_classifier, train_toy_dit, train_toy_unet

    args = cfg[cfg.action]
    def resolved(dtype) -> str:  # "auto": bfloat16 where the CPU computes it natively, float32 elsewhere
        return auto_dtype("cpu")[0] if str(dtype) == "auto" else str(dtype)

    args.dtype = resolved(args.dtype)
    if cfg.action == "train":
        args.train_dtype = resolved(args.train_dtype)
        if args.train_dtype not in ("float32", "bfloat16"):
            raise BigainError(f"--train_dtype {args.train_dtype}: the toy denoisers train in float32 or bfloat16 "
                              "(autocast) on the CPU; pick one of those, or auto")
        if args.checkpoint_every < 1:
            raise BigainError(f"--checkpoint_every must be at least 1, got {args.checkpoint_every}")
        bf16 = args.train_dtype == "bfloat16"
        assets = Path(args.out)
        command = _train_command(args)
        start = time.perf_counter()
        if args.classifier_steps > 0:
            train_toy_classifier(assets, steps=args.classifier_steps, seed=args.seed, log=_log,
                                 progress=lambda s, r: _log(f"classifier step {s}: loss {r['loss']:.4f}"))
        elif not (assets / "classifier.safetensors").is_file():
            raise BigainError(f"--classifier_steps 0 keeps the toy classifier in {assets}, but there is no "
                              "classifier.safetensors there: train one (--classifier_steps 600) or copy it in")
        if "dit" in args.denoisers:
            train_toy_dit(assets, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                          init_from=args.init_from, loss_weighting=args.loss_weighting, bf16=bf16,
                          checkpoint_every=args.checkpoint_every, log=_log,
                          progress=lambda s, r: _log(f"dit step {s}: loss {r['loss_smoothed']:.4f} ({r['seconds']} s)"))
        if "unet" in args.denoisers:
            train_toy_unet(assets, steps=args.unet_steps, batch_size=args.batch_size, seed=args.seed,
                           loss_weighting=args.loss_weighting, lr=args.unet_lr, ema_decay=args.unet_ema_decay,
                           init_from=args.unet_init_from, warmup=50 if args.unet_init_from is None else 20,
                           bf16=bf16, checkpoint_every=args.checkpoint_every, log=_log,
                           progress=lambda s, r: _log(f"unet step {s}: loss {r['loss_smoothed']:.4f} "
                                                      f"({r['seconds']} s)"))
        _log(f"trained in {time.perf_counter() - start:.0f} s")
        if args.no_eval:
            return 0
    previous: dict[str, Any] = {}
    if cfg.action == "evaluate":
        assets = Path(args.assets or ASSETS)
        command = "bigain toy evaluate" + (f" --assets {args.assets}" if args.assets else "")
        meta = assets / "metrics.json"
        if meta.is_file():  # the card keeps the command that trained the models, in today's spelling
            import json

            previous = json.loads(meta.read_text())
            recorded = previous.get("command", command)
            command = "\n".join(" ".join(undeprecate(line.split(), build_parser(), note=False))
                                 for line in recorded.splitlines())  # one command per line
    from bigain.toy import TOY_DENOISERS

    metrics: dict[str, Any] = {"command": command, "seed": args.seed, "evaluation_dtype": args.dtype}
    metrics.update({k: previous[k] for k in TOY_DENOISERS if k not in args.denoisers and k in previous})
    _log("toy classifier accuracy ...")
    metrics["classifier_accuracy"] = classifier_accuracy(assets / "classifier.safetensors", images=1000)
    metrics["classifier_images"] = 1000
    for key, spec in TOY_DENOISERS.items():
        path = assets / spec["folder"]
        if key not in args.denoisers:
            continue
        if not path.is_dir():
            _log(f"no {spec['label']} in {assets}: not measured")
            continue
        backbone, found = spec["backbone"], {}
        _log(f"{spec['label']}: diffusion-classifier accuracy on {args.images} images (uncompressed) ...")
        clean = diffusion_classifier_accuracy(backbone=backbone, path=path, images=args.images, dtype=args.dtype)
        found.update({f"dc_{k}": v for k, v in clean.items()})
        found["dc_images"] = args.images
        found["evaluation_dtype"] = args.dtype
        _log(f"... and with tome ratio 0.7 on {spec['layers']} ...")
        tome = diffusion_classifier_accuracy(backbone=backbone, path=path, images=args.images, compressor="tome",
                                             compressor_options={"ratio": 0.7}, blocks=spec["blocks"],
                                             dtype=args.dtype)
        found["dc_tome70_accuracy"] = tome["accuracy"]
        found["tome_layers"] = spec["layers"]
        _log(f"{spec['label']}: class fidelity of generated samples ...")
        found["class_fidelity"] = class_fidelity(backbone=backbone, path=path, per_class=args.fidelity_per_class,
                                                 classifier=assets / "classifier.safetensors")
        found["fidelity_per_class"] = args.fidelity_per_class
        metrics[key] = found
    card = write_model_card(assets, metrics, command=command, seed=args.seed)
    for key, value in metrics.items():
        _log(f"  {key}: {value}")
    print(card)
    return 0
