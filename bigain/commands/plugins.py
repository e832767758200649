"""List every discovered compressor: name, class, distribution, version, and whether it loads.

Set BIGAIN_DISABLE_PLUGIN_AUTOLOAD=1 to see only bigain's own compressors.
"""

from __future__ import annotations

import argparse
import json

from bigain.registry import plugin_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    rows = plugin_report()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0 if all(r.ok for r in rows) else 1
    header = ("name", "class", "distribution", "version", "status")
    table = [header] + [(r.name, r.target, r.distribution, r.version, r.status) for r in rows]
    widths = [max(len(str(row[i])) for row in table[:]) if i < 4 else 0 for i in range(5)]
    for row in table:
        print("  ".join(str(v).ljust(widths[i]) if i < 4 else str(v) for i, v in enumerate(row)))
    return 0 if all(r.ok for r in rows) else 1
