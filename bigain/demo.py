"""``bigain demo``: every compressor on both jobs, on the bundled toy models, in minutes on a CPU.

The demo is a sweep (:mod:`bigain.sweep`) over the toy dataset and the two toy denoisers (the DiT
and the UNet, :data:`bigain.toy.TOY_DENOISERS`) - classification with the adaptive Diffusion
Classifier protocol and class-conditional generation - followed by the report
(:mod:`bigain.reporting`) and a plain-language reading of what the numbers show. Its defaults trade
images and protocol size for its time budget and say so in ``report.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from bigain.metric import get_metric
from bigain.toy import TOY_DENOISERS

__all__ = ["DEMO_COMPRESSORS", "DEMO_BACKBONES", "demo_sweep", "findings", "write_demo_report"]

#: The toy denoisers the demo runs (``--backbones`` narrows it), by their sweep label.
DEMO_BACKBONES: tuple[str, ...] = tuple(TOY_DENOISERS)

#: What the demo compares (``--methods`` narrows it).
DEMO_COMPRESSORS: list[Any] = [
    "none",
    {"name": "tome", "grid": {"ratio": [0.5, 0.7]}},
    {"name": "bigain_tm", "grid": {"ratio": [0.5, 0.7]}},
    {"name": "sito", "grid": {"ratio": [0.5, 0.7]}},
    {"name": "todo", "grid": {"factor": [2]}},
    {"name": "bigain_td", "grid": {"factor": [2]}},
]


def demo_sweep(*, out: str | Path, quick: bool, images: int | None = None, gen_per_class: int | None = None,
               methods: list[str] | None = None, accelerator: str = "auto", dtype: str = "float32",
               tasks: tuple[str, ...] = ("classify", "generate"), compile: str = "none",
               backbones: tuple[str, ...] = DEMO_BACKBONES) -> dict[str, Any]:
    """The sweep specification the demo runs: every compressor on each toy denoiser in ``backbones``
    (``dit``, ``unet``), the cells in ``<task>/toy/<backbone>/<method>``."""
    images = images if images is not None else (30 if quick else 100)
    per_class = gen_per_class if gen_per_class is not None else (2 if quick else 4)
    compressors = DEMO_COMPRESSORS
    if methods:
        known = {c if isinstance(c, str) else c["name"] for c in DEMO_COMPRESSORS}
        compressors = [c for c in DEMO_COMPRESSORS if (c if isinstance(c, str) else c["name"]) in set(methods)]
        compressors += [m for m in methods if m not in known]
        if "none" not in methods:
            compressors.insert(0, "none")  # the baseline every method is compared with
    trainer = {"accelerator": accelerator, "devices": 1, "enable_progress_bar": False}
    protocol = {"n_samples": [3, 8], "to_keep": [3, 1]} if quick else {"n_samples": [4, 10], "to_keep": [3, 1]}
    unknown = [b for b in backbones if b not in TOY_DENOISERS]
    if unknown or not backbones:
        from bigain.errors import ConfigError

        raise ConfigError(f"the demo's backbones are {', '.join(TOY_DENOISERS)}, got {list(backbones)}")
    return {
        "out": str(out),
        "tasks": list(tasks),
        "backbones": [{"label": b, "model": {"backbone": TOY_DENOISERS[b]["backbone"],
                                              "blocks": TOY_DENOISERS[b]["blocks"]}} for b in backbones],
        "datasets": [{"class_path": "toy", "label": "toy",
                      "init_args": {"length": images, "batch_size": 4}}],
        "compressors": compressors,
        "classify": {"model": {"backbone_options": {"dtype": dtype}, "compile": compile,
                               "batch_size": 128, **protocol},
                     "trainer": trainer},
        "generate": {"model": {"backbone_options": {"dtype": dtype}, "compile": compile,
                               "steps": 10 if quick else 25, "guidance_scale": 4.0,
                               "feature_extractor": "toy", "fidelity_classifier": "toy",
                               "metrics": ["fid", "kid", "class_fidelity"]},
                     "data": {"init_args": {"length": 10 * per_class}},
                     "trainer": trainer},
    }


def _pick(summary: pd.DataFrame, task: str, method: str, **hp: Any) -> pd.Series | None:
    part = summary[(summary["task"] == task) & (summary["method"] == method)]
    for _, row in part.iterrows():
        params = json.loads(row["hyperparameters"]) if isinstance(row["hyperparameters"], str) else {}
        if all(params.get(k) == v for k, v in hp.items()):
            return row
    return None


def _num(row: pd.Series | None, key: str) -> float | None:
    if row is None or key not in row or row[key] is None:
        return None
    value = row[key]
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def _head_to_head(records: pd.DataFrame | None, a: pd.Series | None, b: pd.Series | None) -> str:
    """McNemar's exact test of two methods on the images both classified."""
    from bigain.reporting import paired_comparison

    if records is None or a is None or b is None or "run" not in records:
        return ""
    res = paired_comparison(records[records["run"] == a["run"]], records[records["run"] == b["run"]])
    if not res["paired_images"]:
        return ""
    verdict = "significant at 0.05" if res["mcnemar_p"] < 0.05 else "not significant at 0.05"
    return (f"; head to head on the same {res['paired_images']} images: {res['only_method_right']} right only "
            f"with {b['method']}, {res['only_baseline_right']} right only with {a['method']}, McNemar p = "
            f"{res['mcnemar_p']:.3g} ({verdict})")


def findings(summary: pd.DataFrame, records: pd.DataFrame | None = None) -> list[str]:
    """Plain sentences on what the numbers show - including where BiGain does not win - for each
    toy denoiser in ``summary`` (named in front of its sentences when there are several)."""
    if summary.empty or "backbone" not in summary:
        return _findings(summary, records)
    names = {spec["backbone"]: spec["label"] for spec in TOY_DENOISERS.values()}
    backbones = list(dict.fromkeys(summary["backbone"].dropna()))
    if len(backbones) <= 1:
        return _findings(summary, records)
    out: list[str] = []
    for backbone in backbones:
        name = names.get(backbone, backbone)
        part = summary[summary["backbone"] == backbone]
        out += [f"{name[0].upper()}{name[1:]}: {s}" for s in _findings(part, records)]
    return out


def _findings(summary: pd.DataFrame, records: pd.DataFrame | None = None) -> list[str]:
    out: list[str] = []
    base = _pick(summary, "classify", "none")
    base_acc = _num(base, "accuracy")
    for ratio in (0.5, 0.7):
        tome, tm = _pick(summary, "classify", "tome", ratio=ratio), _pick(summary, "classify", "bigain_tm", ratio=ratio)
        a, b = _num(tome, "accuracy"), _num(tm, "accuracy")
        if a is None or b is None:
            continue
        diff = b - a
        verdict = ("bigain_tm beats tome" if diff > 0 else "bigain_tm does not beat tome" if diff < 0
                   else "bigain_tm ties tome")
        text = (f"Classification at merge ratio {ratio}: tome {100 * a:.1f}%, bigain_tm {100 * b:.1f}% "
                f"({100 * diff:+.1f} points): {verdict}")
        if base_acc is not None:
            text += f"; uncompressed {100 * base_acc:.1f}%, so {int(100 * ratio)}% tome costs " \
                    f"{100 * (base_acc - a):.1f} points"
        out.append(text + _head_to_head(records, tome, tm) + ".")
    todo, td = _pick(summary, "classify", "todo"), _pick(summary, "classify", "bigain_td")
    a, b = _num(todo, "accuracy"), _num(td, "accuracy")
    if a is not None and b is not None:
        verdict = "bigain_td beats todo" if b > a else "bigain_td does not beat todo" if b < a else "they tie"
        out.append(f"Key/value downsampling (factor 2): todo {100 * a:.1f}%, bigain_td {100 * b:.1f}%: {verdict}"
                   + _head_to_head(records, todo, td) + ".")
    for (m1, hp1), (m2, hp2) in ((("tome", {"ratio": 0.7}), ("bigain_tm", {"ratio": 0.7})),
                                 (("todo", {}), ("bigain_td", {}))):
        f1, f2 = _num(_pick(summary, "generate", m1, **hp1), "fid"), _num(_pick(summary, "generate", m2, **hp2), "fid")
        if f1 is not None and f2 is not None:
            fid = get_metric("fid")  # its label and direction
            up = "better" if fid.higher_is_better else "worse"
            down = "worse" if fid.higher_is_better else "better"
            better = f"lower ({down})" if f2 < f1 else f"higher ({up})" if f2 > f1 else "equal"
            out.append(f"Generation, toy-feature {fid.label}: {m1} {f1:.2f}, {m2} {f2:.2f} - {m2}'s {fid.label} is "
                       f"{better}. FIDs on a few dozen images are noisy; treat small differences as ties.")
    if "speedup" in summary:
        parts = []
        for task, what in (("classify", "classification"), ("generate", "generation")):
            speeds = summary[(summary["task"] == task) & summary["speedup"].notna()]
            if len(speeds):
                fastest = speeds.sort_values("speedup").iloc[-1]
                parts.append(f"{fastest['speedup']:.2f}x in {what} ({fastest['method']})")
        if parts:
            out.append(f"Measured speed-ups on this machine (denoiser time): the largest are {' and '.join(parts)}. "
                       f"A toy model is small (attention is a modest share of its work), so speed claims at "
                       f"Stable Diffusion scale need `bigain bench` on an SD-sized model.")
    return out


def write_demo_report(out: Path, report: dict[str, Any], settings: dict[str, Any]) -> Path:
    """``report.md``: settings, findings, the tables and plots of the sweep report."""
    summary = report["summary"]
    lines = ["# bigain demo: every compressor on both jobs, on the toy models", ""]
    lines += ["## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items()] + [""]
    lines += ["## What the numbers show", ""] + [f"- {s}" for s in findings(summary, report["records"])] + [""]
    body = report["markdown"].split("\n", 1)[1] if report["markdown"].startswith("# ") else report["markdown"]
    body = body.replace("](", "](report/")
    lines += [body, ""]
    sheets = sorted(Path(out).glob("generate/toy/**/contact_sheet.png"))
    if sheets:
        lines += ["## Samples", ""] + [f"![{p.parent.relative_to(Path(out) / 'generate' / 'toy')}]"
                                       f"({p.relative_to(out)})" for p in sheets] + [""]
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines))
    return path
