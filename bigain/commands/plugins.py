"""List every discovered compressor and denoiser adapter: name, class, distribution, version, and
whether it loads.

Set BIGAIN_DISABLE_PLUGIN_AUTOLOAD=1 to see only bigain's own plugins.
"""

from __future__ import annotations

import json
from typing import Any

from bigain.adapters import ADAPTERS
from bigain.commands._parser import new_parser
from bigain.registry import plugin_report


def build_parser():
    parser = new_parser("plugins", __doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run(args: Any) -> int:
    groups = {"compressor": plugin_report(), "adapter": ADAPTERS.report()}
    ok = all(r.ok for rows in groups.values() for r in rows)
    if args.json:
        print(json.dumps([{"kind": kind, **r.__dict__} for kind, rows in groups.items() for r in rows], indent=2))
        return 0 if ok else 1
    table = []
    for kind, rows in groups.items():  # one header row per kind: compressors first, then adapters
        table.append((kind, "class", "distribution", "version", "status"))
        table += [(r.name, r.target, r.distribution, r.version, r.status) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(str(v).ljust(widths[i]) if i < 4 else str(v) for i, v in enumerate(row)))
    return 0 if ok else 1
