"""Train, evaluate and document the bundled toy models.

  bigain toy train [--out DIR]      train the toy classifier (a few minutes) and the toy DiT (just
                                    under an hour on 2 CPU cores), then evaluate them and write
                                    MODEL_CARD.md; --classifier-steps 0 keeps the classifier in DIR
  bigain toy evaluate [--assets DIR] measure the models again and rewrite MODEL_CARD.md

DIR defaults to the package's own assets folder (bigain/toy/assets), which is what `bigain demo`
and the `toy` backbone load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bigain.errors import BigainError
from bigain.toy.evaluate import ASSETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train", "evaluate"])
    parser.add_argument("--out", "--assets", dest="assets", default=str(ASSETS), help="models folder")
    parser.add_argument("--steps", type=int, default=9000, help="DiT training steps (train)")
    parser.add_argument("--batch-size", type=int, default=32, help="DiT training batch size (train)")
    parser.add_argument("--classifier-steps", type=int, default=600,
                        help="classifier training steps (train); 0 keeps the classifier already in the models "
                             "folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-weighting", choices=["min_snr", "p2", "none"], default="min_snr",
                        help="weighting of the DiT's epsilon loss over noise levels: min-SNR-5, P2 (favours the "
                             "high-noise steps where shapes form) or none (train)")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="continue training from a saved toy DiT folder (holding transformer/) instead of "
                             "starting from scratch (train)")
    parser.add_argument("--images", type=int, default=500, help="test images for the diffusion-classifier accuracy")
    parser.add_argument("--fidelity-per-class", type=int, default=20, help="generated samples per class")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                        help="precision of the evaluation forwards (default bfloat16: same accuracy, faster on CPUs)")
    parser.add_argument("--no-eval", action="store_true", help="train only (no metrics, no model card)")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from bigain.toy.evaluate import class_fidelity, classifier_accuracy, diffusion_classifier_accuracy, write_model_card
    from bigain.toy.train import train_toy_classifier, train_toy_dit

    assets = Path(args.assets)
    command = ("bigain toy train" + (f" --out {args.assets}" if args.assets != str(ASSETS) else "")
               + f" --steps {args.steps} --batch-size {args.batch_size} --classifier-steps {args.classifier_steps}"
               + f" --loss-weighting {args.loss_weighting} --seed {args.seed}")
    if args.action == "train":
        start = time.perf_counter()
        if args.classifier_steps > 0:
            train_toy_classifier(assets, steps=args.classifier_steps, seed=args.seed,
                                 progress=lambda s, r: _log(f"classifier step {s}: loss {r['loss']:.4f}"))
        elif not (assets / "classifier.safetensors").is_file():
            raise BigainError(f"--classifier-steps 0 keeps the toy classifier in {assets}, but there is no "
                              "classifier.safetensors there: train one (--classifier-steps 600) or copy it in")
        train_toy_dit(assets, steps=args.steps, batch_size=args.batch_size, seed=args.seed, init_from=args.init_from,
                      loss_weighting=args.loss_weighting,
                      progress=lambda s, r: _log(f"dit step {s}: loss {r['loss_smoothed']:.4f} ({r['seconds']} s)"))
        _log(f"trained in {time.perf_counter() - start:.0f} s")
        if args.no_eval:
            return 0
    else:
        meta = assets / "metrics.json"
        if meta.is_file():
            import json

            command = json.loads(meta.read_text()).get("command", command)
    from bigain.toy import TOY_COMPRESSED_BLOCKS

    blocks = list(TOY_COMPRESSED_BLOCKS)
    metrics = {"command": command, "seed": args.seed, "evaluation_dtype": args.dtype}
    _log("toy classifier accuracy ...")
    metrics["classifier_accuracy"] = classifier_accuracy(assets / "classifier.safetensors", images=1000)
    metrics["classifier_images"] = 1000
    path = assets / "toy-dit"
    _log(f"diffusion-classifier accuracy on {args.images} images (uncompressed) ...")
    clean = diffusion_classifier_accuracy(path=path, images=args.images, dtype=args.dtype)
    metrics.update({f"dc_{k}": v for k, v in clean.items()})
    metrics["dc_images"] = args.images
    _log(f"... and with tome ratio 0.7 on blocks {blocks} ...")
    tome = diffusion_classifier_accuracy(path=path, images=args.images, compressor="tome",
                                         compressor_options={"ratio": 0.7}, blocks=blocks, dtype=args.dtype)
    metrics["dc_tome70_accuracy"] = tome["accuracy"]
    metrics["tome_blocks"] = blocks
    _log("class fidelity of generated samples ...")
    metrics["class_fidelity"] = class_fidelity(path=path, per_class=args.fidelity_per_class,
                                               classifier=assets / "classifier.safetensors")
    metrics["fidelity_per_class"] = args.fidelity_per_class
    card = write_model_card(assets, metrics, command=command, seed=args.seed)
    for key, value in metrics.items():
        _log(f"  {key}: {value}")
    print(card)
    return 0
