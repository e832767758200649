"""The ``bigain`` command.

Each subcommand lives next to what it runs; this module only dispatches. ``bigain --help`` lists
them and ``bigain COMMAND --help`` documents each one. Every command is parsed by jsonargparse, so
every one takes ``--config FILE``, ``--print_config`` and underscore flags (``--run_dir``,
``--model_path``); see ``bigain.commands._parser``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bigain.errors import BigainError
from bigain.interrupts import Interrupted, handle_signals, nested

# name -> (module, one-line help). Each module defines `build_parser()` (a jsonargparse parser) and
# `run(cfg) -> int`, or `main(argv) -> int` (classify / generate: LightningCLI builds their parser).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("bigain.commands.demo", "the main job: every compressor on both jobs on the toy model, with a report"),
    "plugins": ("bigain.commands.plugins", "list every discovered compressor and whether it loads"),
    "classify": ("bigain.commands.classify", "evaluate a (compressed) diffusion model as an image classifier"),
    "generate": ("bigain.commands.generate", "generate images with a (compressed) diffusion model and score them"),
    "sweep": ("bigain.commands.sweep", "run a grid of compressors x options x tasks x datasets, then report"),
    "report": ("bigain.commands.report", "merge runs into one report: tables, paired statistics, plots"),
    "toy": ("bigain.commands.toy", "train, evaluate and document the bundled toy models"),
    "bench": ("bigain.commands.bench", "time one denoiser forward under each compressor, side by side"),
    "visualize": ("bigain.commands.visualize", "merge maps, frequency retention and side-by-side samples, as PNGs"),
}

#: Top-level modules of the evaluation stack (the ``eval`` extra, not in the light install): a command
#: that needs one says which extra to install instead of printing a traceback.
EVAL_MODULES = frozenset({"lightning", "pytorch_lightning", "jsonargparse", "pandas", "pyarrow", "matplotlib",
                          "timm", "torchmetrics", "torch_fidelity", "transformers", "torchvision", "accelerate"})

#: Commands that keep their finished work when stopped and resume it when started again.
RESUMABLE = ("classify", "generate", "sweep", "demo", "toy train")


def _build_parser() -> argparse.ArgumentParser:
    from bigain import __version__

    parser = argparse.ArgumentParser(
        prog="bigain",
        description="Token compression for diffusion models that generate and classify images.",
        epilog="Every command takes --config FILE (a YAML file of its options), --print_config (the resolved "
               "configuration, as YAML) and underscore flags (--run_dir, --model_path); `bigain COMMAND --help` "
               "lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"bigain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help / version / an error, and exits
        return 2
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        return _missing_extra(name, exc)
    with handle_signals():  # SIGINT / SIGTERM -> Interrupted: runs save what they finished and stop
        try:
            if hasattr(module, "main"):
                return int(module.main(rest) or 0)
            from bigain.commands._parser import parse

            return int(module.run(parse(module.build_parser(), rest)) or 0)
        except BigainError as exc:
            print(f"bigain {name}: error: {exc}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as exc:
            return _missing_extra(name, exc)
        except Interrupted as exc:
            if nested():  # a sweep's in-process cell: the sweep records it and stops
                raise
            resumable = name in RESUMABLE or f"{name} {rest[0] if rest else ''}" in RESUMABLE
            hint = "; what finished is saved, run the same command again to resume" if resumable else ""
            print(f"bigain {name}: {exc}{hint}", file=sys.stderr)
            return exc.exit_code


def _missing_extra(name: str, exc: ModuleNotFoundError) -> int:
    if (exc.name or "").split(".")[0] not in EVAL_MODULES:
        raise exc
    print(f"bigain {name}: error: {exc}: `bigain {name}` needs the evaluation stack, which the light install "
          f"leaves out: pip install 'bigain[eval]'", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
