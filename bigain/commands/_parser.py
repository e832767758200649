"""What every ``bigain`` command's command line shares (jsonargparse, like ``classify``/``generate``).

* ``-c/--config FILE`` (also ``--config=FILE``): a YAML file whose keys are the options without the
  leading ``--`` (nested options as nested mappings); flags after it override it.
* ``--print_config``: print the resolved configuration (file + flags) as YAML and exit; the output
  is itself a valid ``--config`` file.
* One flag style, underscores (``--run_dir``, ``--model_path``, ``--dry_run``). The hyphenated
  spellings of earlier versions (``--model-path``) still work and print a one-line deprecation
  note to stderr.
* One dtype vocabulary: :class:`DType` accepts ``float32``/``fp32``, ``float16``/``fp16``,
  ``bfloat16``/``bf16`` and keeps the first (PyTorch's) spelling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import register_type

from bigain.precision import canonical_dtype

__all__ = ["DType", "DTypeOrAuto", "new_parser", "parse", "undeprecate"]


class DType(str):
    """A dtype name in its canonical spelling: ``float32``, ``float16`` or ``bfloat16`` (``fp32``,
    ``fp16`` and ``bf16`` are accepted)."""

    def __new__(cls, value: object) -> DType:
        return super().__new__(cls, canonical_dtype(value))


class DTypeOrAuto(str):
    """Like :class:`DType`, or ``auto`` (the command picks the dtype for the device)."""

    def __new__(cls, value: object) -> DTypeOrAuto:
        return super().__new__(cls, canonical_dtype(value, allow_auto=True))


register_type(DType, serializer=str, deserializer=DType)
register_type(DTypeOrAuto, serializer=str, deserializer=DTypeOrAuto)


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter (types and defaults shown), keeping the description's own line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def new_parser(name: str, description: str | None, *, config: bool = True) -> ArgumentParser:
    """A parser for ``bigain NAME`` with ``-c/--config`` (and so ``--print_config``)."""
    parser = ArgumentParser(prog=f"bigain {name}", description=description, formatter_class=HelpFormatter,
                            default_env=False)
    if config:
        parser.add_argument("-c", "--config", action=ActionConfigFile,
                            help="a YAML file of options: keys are the flags without '--', nested options as "
                                 "nested mappings; flags after it override it")
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def undeprecate(argv: Sequence[str], parser: argparse.ArgumentParser, *, note: bool = True) -> list[str]:
    """``argv`` with each hyphenated spelling of an option (``--model-path``) replaced by the
    underscore one the parser knows (``--model_path``), with a one-line note on stderr for each
    (unless ``note`` is false)."""
    known = {opt for p in _parsers(parser) for action in p._actions for opt in action.option_strings}
    out: list[str] = []
    noted: set[str] = set()
    for i, arg in enumerate(argv):
        if arg == "--":
            out += argv[i:]
            break
        flag, sep, value = arg.partition("=")
        if flag.startswith("--") and "-" in flag[2:] and flag not in known:
            new = "--" + flag[2:].replace("-", "_")
            if new in known:
                if note and flag not in noted:
                    print(f"{parser.prog}: {flag} is deprecated, use {new}", file=sys.stderr)
                    noted.add(flag)
                arg = new + sep + value
        out.append(arg)
    return out


def parse(parser: ArgumentParser, argv: Sequence[str]):
    """Parse ``argv`` (deprecated spellings translated) into a jsonargparse Namespace."""
    return parser.parse_args(undeprecate(list(argv), parser))
