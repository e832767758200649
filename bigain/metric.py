"""Metrics as plugins: what a reported number is called, which way is better, and where it applies.

A metric is a :class:`Metric` subclass registered in the entry-point group ``bigain.metrics``,
exactly like a compressor; bigain's own are declared in its ``pyproject.toml``::

    [project.entry-points."bigain.metrics"]
    brier = "my_package.metrics:Brier"

Reports, plots and the demo's findings take a metric's label and direction from here, so a metric
added by a plugin gets its table column and its trade-off plot with no change to bigain. A run's
value of a metric is :meth:`Metric.from_records` of its records when the metric computes one, else
the number the run recorded under the metric's name (its summary, or ``run.json``'s ``metrics``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pandas as pd

from bigain.registry import PluginRegistry

__all__ = ["Metric", "METRICS", "list_metrics", "get_metric", "register_metric", "metrics_for", "TASKS"]

#: The tasks a metric can apply to: ``bigain classify`` and ``bigain generate`` runs.
TASKS = ("classify", "generate")


class Metric:
    """One number reported per run.

    Class attributes:
        name: the key of the number in run records, summaries and report columns (the
            entry-point name; filled in from it when left empty).
        label: how tables and plot axes name it ("FID").
        higher_is_better: its direction (torchmetrics' ``higher_is_better``).
        tasks: where it applies, among :data:`TASKS`.
        column: the report table's column header (default: the label).
        plot: whether reports draw its trade-off plot against the measured speedup.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    tasks: ClassVar[tuple[str, ...]] = ("classify",)
    column: ClassVar[str] = ""
    plot: ClassVar[bool] = True

    @property
    def direction(self) -> Literal["higher", "lower"]:
        """``"higher"`` or ``"lower"``: which way is better."""
        return "higher" if self.higher_is_better else "lower"

    @property
    def direction_label(self) -> str:
        """``"higher is better"`` / ``"lower is better"``."""
        return f"{self.direction} is better"

    def from_records(self, records: pd.DataFrame) -> float | None:
        """The run's value computed from its records (one row per dataset index), or ``None`` to
        use the number the run recorded under :attr:`name`."""
        return None

    def format(self, row: Any) -> Any:
        """The table cell of a run (``row`` holds the run's summary): the value by default."""
        return row.get(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, {self.direction} is better, tasks={self.tasks})"


METRICS: PluginRegistry = PluginRegistry("bigain.metrics", kind="metric", base=Metric)


def list_metrics() -> list[str]:
    """Names of every available metric, without importing plugin code."""
    return METRICS.names()


def get_metric(name: str) -> Metric:
    """The metric registered as ``name`` (an instance; its ``name`` and ``label`` filled in)."""
    cls = METRICS.get(name)
    metric = cls()
    if not cls.name:
        metric.name = name  # type: ignore[misc]  # an instance attribute shadows the empty default
    if not cls.label:
        metric.label = metric.name  # type: ignore[misc]
    if not cls.column:
        metric.column = metric.label  # type: ignore[misc]
    bad = sorted(set(metric.tasks) - set(TASKS))
    if bad:
        from bigain.errors import PluginLoadError

        raise PluginLoadError(f"metric {name!r} applies to unknown task(s) {bad}; tasks are {list(TASKS)}")
    return metric


def register_metric(name: str, cls: type | None = None, *, override: bool = False):
    """Register a metric class in this process (also usable as a decorator)."""
    return METRICS.register(name, cls, override=override)


def metrics_for(task: str) -> list[Metric]:
    """Every metric that applies to ``task``, the built-ins first (in their declared order), then
    the others by name. A plugin that fails to load is left out with a warning."""
    import warnings

    out = []
    for name in list_metrics():
        try:
            metric = get_metric(name)
        except Exception as exc:  # a broken plugin never breaks a report
            warnings.warn(f"metric {name!r} left out: {exc}", stacklevel=2)
            continue
        if task in metric.tasks:
            out.append(metric)
    order = {name: i for i, name in enumerate(_BUILTIN_ORDER)}
    return sorted(out, key=lambda m: (order.get(m.name, len(order)), m.name))


_BUILTIN_ORDER = ("accuracy", "top5_accuracy", "mAP", "fid", "kid", "is", "clip_score", "class_fidelity")


# -- the built-ins (registered in pyproject.toml) ---------------------------------------------------

class Accuracy(Metric):
    """Top-1 accuracy of the diffusion classifier, with its 95% Wilson interval in the table."""

    label = "accuracy"
    column = "accuracy [95% CI]"
    tasks = ("classify",)

    def from_records(self, records: pd.DataFrame) -> float | None:
        if "correct" not in records or not len(records):
            return None
        return float(records["correct"].astype(bool).mean())

    def format(self, row: Any) -> Any:
        value, low, high = row.get("accuracy"), row.get("accuracy_low"), row.get("accuracy_high")
        if value is None or pd.isna(value):
            return None
        if low is None or pd.isna(low):
            return f"{value:.3f}"
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"


class Top5Accuracy(Metric):
    """Top-5 accuracy (the true class among the five best)."""

    label = "top-5 accuracy"
    tasks = ("classify",)
    plot = False


class MeanAveragePrecision(Metric):
    """Mean average precision of multi-label runs."""

    label = "mAP"
    tasks = ("classify",)
    plot = False


class FID(Metric):
    """Fréchet distance between generated and real features."""

    label = "FID"
    higher_is_better = False
    tasks = ("generate",)


class KID(Metric):
    """Kernel Inception distance (unbiased MMD of features)."""

    label = "KID"
    higher_is_better = False
    tasks = ("generate",)
    plot = False


class InceptionScore(Metric):
    """Inception score of the generated images."""

    label = "IS"
    tasks = ("generate",)
    plot = False


class CLIPScore(Metric):
    """CLIP score between each generated image and its prompt."""

    label = "CLIP score"
    tasks = ("generate",)
    plot = False


class ClassFidelity(Metric):
    """Share of generated images a classifier assigns to the class they were generated for."""

    label = "class fidelity"
    tasks = ("generate",)
    plot = False
