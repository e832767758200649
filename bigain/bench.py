"""Denoiser speed, FLOPs and memory under each compressor, measured side by side.

Backbones come from bundled diffusers configs (``bigain/benchconfigs/``) with random weights: speed
and FLOPs do not depend on weight values. Methods run interleaved in one process - every repeat
times each method once, in turn - so their ratios share the machine's state (thermal, caches, other
load) and are comparable; absolute times are only meaningful on a quiet, dedicated machine.

GFLOPs come from ``torch.utils.flop_counter`` (matrix multiplications and attention), including the
compressors' own matching work; PyTorch registers no formula for the CPU attention kernel, so one is
registered here (``4 * B * H * Lq * Lk * D``).
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from bigain.backbones.base import COMPILE_MODES
from bigain.errors import BigainError, ConfigError, UnknownNameError
from bigain.patching import apply
from bigain.registry import create_compressor

__all__ = ["BENCH_MODELS", "DEFAULT_METHODS", "COMPILE_MODES", "MethodSpec", "parse_method", "parse_model",
           "build_bench_model",
           "count_flops", "denoiser_gflops", "run_bench", "classifier_overhead", "format_table"]

#: The bundled configs (``bigain/benchconfigs/<name>.json``) and the toy DiT; ``name:key=value,...``
#: overrides config entries (:func:`parse_model`).
BENCH_MODELS = ("sd2-unet", "sdxl-unet", "dit-xl-2", "pixart-xl-2", "sd3-medium", "flux-dev", "toy")
DEFAULT_METHODS = ("none", "tome:ratio=0.5", "tome:ratio=0.7", "bigain_tm:ratio=0.5", "bigain_tm:ratio=0.7",
                   "sito:ratio=0.5", "sito:ratio=0.7", "todo:factor=2", "bigain_td:factor=2")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked configuration: a compressor (or ``tomesd``) with its options."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_method(spec: str) -> MethodSpec:
    """``"tome:ratio=0.7"`` / ``"bigain_td:factor=2,alpha=0.5"`` / ``"tomesd:ratio=0.5"``."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"method option {part!r} in {spec!r} must look like key=value, e.g. tome:ratio=0.7")
        options[key.strip()] = yaml.safe_load(value)
    if name != "tomesd":
        create_compressor(name, **options)  # validates now, with suggestions
    return MethodSpec(spec, name, options)


# -- models ------------------------------------------------------------------------------------

def _config(name: str) -> dict[str, Any]:
    text = resources.files("bigain").joinpath("benchconfigs", f"{name}.json").read_text()
    return json.loads(text)


def _split_options(text: str) -> list[str]:
    """``"a=1,b=[1,2]"`` -> ``["a=1", "b=[1,2]"]``: commas inside brackets belong to the value."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{(" and 1 or 0
        depth -= ch in "]})" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in (*parts, current) if p.strip()]


def parse_model(spec: str) -> tuple[str, dict[str, Any]]:
    """``"flux-dev:num_layers=2,num_single_layers=4"`` -> ``("flux-dev", {config overrides})``.

    The overrides replace entries of the bundled diffusers config, for a smaller variant of the real
    architecture (fewer blocks, narrower layers): FLUX.1-dev has 12 B parameters (48 GB in fp32),
    ``flux-dev:num_layers=2,num_single_layers=4`` keeps 2 double- and 4 single-stream blocks.
    """
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for part in _split_options(rest):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"model option {part!r} in {spec!r} must look like key=value, e.g. "
                              f"flux-dev:num_layers=2,num_single_layers=4")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def _bundled(name: str, resolution: int, overrides: dict[str, Any]) -> nn.Module:
    """A bundled config's denoiser (its ``_class_name`` from diffusers) with random weights."""
    import diffusers

    if name == "toy":
        from bigain.toy.train import TOY_DIT_CONFIG

        raw: dict[str, Any] = {"_class_name": "DiTTransformer2DModel", **TOY_DIT_CONFIG}
    elif name in BENCH_MODELS:
        raw = _config(name)
        if raw.get("_sample_size_from_resolution"):
            raw["sample_size"] = resolution // 8
    else:
        raise UnknownNameError(f"unknown bench model {name!r}; choose one of {', '.join(BENCH_MODELS)} "
                               f"or give --model-path PATH_OR_ID")
    cls = getattr(diffusers, raw["_class_name"])
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(set(overrides) - set(cfg) - set(inspect.signature(cls.__init__).parameters))
    if unknown:
        raise ConfigError(f"bench model {name!r} ({cls.__name__}) has no config entries {unknown}; its entries are "
                          f"{', '.join(sorted(cfg))}")
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return cls.from_config(cfg)
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise ConfigError(f"bench model {name!r} with overrides {overrides} is not a valid {cls.__name__}: "
                              f"{type(exc).__name__}: {exc}") from exc


def _load(path: str) -> nn.Module:
    """A denoiser from a checkpoint: a pipeline's ``unet``, else its ``transformer`` of whatever
    diffusers class its config names."""
    import diffusers
    from diffusers import UNet2DConditionModel

    from bigain.backbones.loading import load_component

    try:
        return load_component(UNet2DConditionModel, path, "unet", what="UNet")
    except Exception:
        cls = getattr(diffusers, "AutoModel", None) or diffusers.DiTTransformer2DModel
        return load_component(cls, path, "transformer", what="transformer")


def build_bench_model(name: str, *, resolution: int, batch_size: int, dtype: str = "fp32",
                      device: str = "cpu", path: str | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
    """A denoiser with random weights (or from ``path``), its forward inputs, and a description.

    ``name`` is a bundled config, optionally with config overrides (:func:`parse_model`); the inputs
    are the family adapter's example inputs for a ``resolution // 8`` latent.
    """
    from bigain.adapters import find_adapter

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    dt = _DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    if path is not None:
        model, source = _load(path), path
    else:
        base, overrides = parse_model(name)
        model = _bundled(base, resolution, overrides)
        extra = f", overrides {json.dumps(overrides, sort_keys=True)}" if overrides else ""
        source = f"bundled config {base}{extra}, random weights"
    model = model.to(device=device, dtype=dt).eval().requires_grad_(False)
    adapter = find_adapter(model)
    cfg = model.config
    # the toy DiT is pixel-space at its own size; a patch-transformer checkpoint runs at the size it was trained at
    fixed = (path is None and name == "toy") or (path is not None and "patch_size" in cfg and "sample_size" in cfg)
    side = int(cfg.sample_size) if fixed else resolution // 8
    inputs = _to(adapter.example_inputs(batch_size, (side, side), generator=g), device, dt)
    params = sum(p.numel() for p in model.parameters())
    return model, inputs, {"model": name if path is None else path, "source": source, "parameters": params}


def _to(obj: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    return obj


# -- measuring ---------------------------------------------------------------------------------

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _bmm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Every ``bmm`` overload, ``bmm.dtype`` (``out_dtype=``, the half-precision similarity products)
    included: some torch releases (2.11) count it with a formula that takes the dtype for ``out_shape``
    and fail."""
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[-1]


def _flop_counter():
    """A ``FlopCounterMode`` that also counts CPU flash attention and ``bmm(out_dtype=)``."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        torch.ops.aten.bmm: _bmm_flops,
    })


def _call(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """Forward with the sample positional (the tomesd package's hook reads ``args[0]``)."""
    first, *rest = inputs
    return model(inputs[first], **{k: inputs[k] for k in rest})


def count_flops(model: nn.Module, inputs: dict[str, Any]) -> int:
    """FLOPs of one forward (multiply-adds count 2)."""
    with torch.no_grad(), _flop_counter() as counter:
        _call(model, inputs)
    return int(counter.get_total_flops())


def denoiser_gflops(backbone: Any, image_size: int) -> float | None:
    """GFLOPs of one denoiser forward at batch 1 for ``image_size`` images, through whatever
    compressor is attached (``None`` when the backbone cannot build a condition yet)."""
    device = backbone.device
    x = torch.zeros(1, *backbone.latent_shape(image_size), device=device)
    t = torch.full((1,), backbone.num_train_timesteps // 2, device=device)
    for make in (lambda: backbone.class_conditions(torch.zeros(1, dtype=torch.long)),  # needs set_classes
                 lambda: backbone.null_conditions(1)):  # a DiT without label dropout has no null class
        try:
            cond = make()
            break
        except (RuntimeError, BigainError):
            continue
    else:
        return None
    with torch.no_grad(), backbone.eager(), _flop_counter() as counter:
        backbone.predict_noise(x, t, cond)
    return counter.get_total_flops() / 1e9


def _forward_seconds(model: nn.Module, inputs: dict[str, Any], device: str) -> float:
    with torch.no_grad():
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _call(model, inputs)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        _call(model, inputs)
        return time.perf_counter() - t0


class _Applied:
    """Apply a method (bigain compressor or the tomesd package) to a model, and undo it."""

    def __init__(self, model: nn.Module, spec: MethodSpec, *, max_downsample: int, blocks: Any,
                 inputs: dict[str, Any] | None = None) -> None:
        self.model, self.spec, self.handle = model, spec, None
        self.max_downsample, self.blocks, self.inputs = max_downsample, blocks, inputs

    def __enter__(self) -> _Applied:
        if self.spec.name == "tomesd":
            import tomesd

            tomesd.apply_patch(self.model, max_downsample=self.max_downsample, **self.spec.options)
        else:
            from bigain.adapters import find_adapter

            selection = find_adapter(self.model).selection(max_downsample=self.max_downsample, blocks=self.blocks)
            self.handle = apply(self.model, self.spec.name, **selection, **self.spec.options)
            if self.inputs is not None:  # token grids a family reads from the inputs once (Flux), before any trace
                self.handle.adapter.token_size((), self.inputs)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.spec.name == "tomesd":
            import tomesd

            tomesd.remove_patch(self.model)
        elif self.handle is not None:
            self.handle.remove()


def _clone_sharing_weights(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original tensors, so each
    method can stay applied (and compiled) on its own copy at the memory cost of one model."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _compiled(model: nn.Module, mode: str, backend: str) -> nn.Module:
    """``model`` itself for ``none`` (eager), else ``torch.compile`` of it (``default`` = mode None)."""
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, backend=backend)


def _first_compiled_call(runner: nn.Module, inputs: dict[str, Any], device: str, *, freeze: bool) -> float:
    """The first call of a compiled runner (tracing, code generation and one forward), in seconds; with
    ``freeze``, inductor treats the weights as constants for this compile (``freezing``: folded and, on a CPU,
    prepacked for oneDNN)."""
    if not freeze:
        return _forward_seconds(runner, inputs, device)
    from torch._inductor import config as inductor_config

    with inductor_config.patch(freezing=True):
        return _forward_seconds(runner, inputs, device)


def run_bench(
    *,
    model: str = "sd2-unet",
    model_path: str | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    resolution: int = 512,
    batch_size: int = 1,
    dtype: str = "fp32",
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    max_downsample: int = 1,
    blocks: Any = "paper",
    compare_tomesd: bool = False,
    flops: bool = True,
    compile_modes: Sequence[str] = ("none",),
    compile_backend: str = "inductor",
    freeze: bool = False,
    progress: Any = None,
):
    """Benchmark ``methods`` on one denoiser; returns ``(DataFrame, info)``.

    With several ``compile_modes`` every method is timed eager (``"none"``) and compiled, side by
    side in the same interleaved rounds. Each method stays applied on its own copy of the model
    (sharing the weights), so a compiled graph is traced once; the first compiled call (tracing,
    code generation and one forward) is reported as ``compile_s`` and is never part of the timing.
    ``freeze`` compiles with inductor's ``freezing`` (the weights become constants, prepacked for oneDNN
    on a CPU; right for inference, where weights do not change). Each frozen graph holds its own copy of
    the weights: five methods of the SD 2.0 UNet in float32 need more than 24 GiB.
    """
    import pandas as pd

    if repeats < 1 or warmup < 0:
        raise ConfigError("repeats must be >= 1 and warmup >= 0")
    modes = list(dict.fromkeys(compile_modes)) or ["none"]
    for mode in modes:
        if mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if model == "toy" and model_path is None:
        resolution = 32  # the toy DiT is pixel-space at 32x32
    specs = [parse_method(m) for m in methods]
    if not specs or specs[0].name != "none":
        specs.insert(0, parse_method("none"))  # the baseline every speedup is measured against
    net, inputs, info = build_bench_model(model, resolution=resolution, batch_size=batch_size, dtype=dtype,
                                          device=device, path=model_path)
    if compare_tomesd:
        if type(net).__name__ != "UNet2DConditionModel":
            info["tomesd"] = "skipped: the tomesd package patches UNets only"
        else:
            ratios = sorted({s.options.get("ratio", 0.5) for s in specs if s.name == "tome"}) or [0.5]
            specs += [MethodSpec(f"tomesd:ratio={r}", "tomesd", {"ratio": r}) for r in ratios]
    times: dict[tuple[str, str], list[float]] = {(s.label, m): [] for s in specs for m in modes}
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:  # warm-up, FLOPs, memory and token counts, one method at a time (eager)
        with _Applied(net, spec, max_downsample=max_downsample, blocks=blocks) as applied:
            for _ in range(warmup):
                _forward_seconds(net, inputs, device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            if applied.handle is not None:
                applied.handle.reset_stats()
            row: dict[str, Any] = {"method": spec.label, "compressor": spec.name,
                                   "options": json.dumps(spec.options, sort_keys=True)}
            row["gflops"] = count_flops(net, inputs) / 1e9 if flops else None
            if device.startswith("cuda"):
                _forward_seconds(net, inputs, device)
                row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            else:
                row["peak_memory_mb"] = None
                if not flops:
                    _forward_seconds(net, inputs, device)  # one forward measures the tokens kept
            row["tokens_kept"] = json.dumps(applied.handle.tokens_kept()) if applied.handle is not None else ""
            rows[spec.label] = row
    compile_s: dict[tuple[str, str], float] = {}
    traced_kept: dict[str, str] = {}
    if modes == ["none"]:
        for r in range(repeats):  # interleaved timing rounds, applying each method in turn
            for spec in specs:
                with _Applied(net, spec, max_downsample=max_downsample, blocks=blocks):
                    times[(spec.label, "none")].append(_forward_seconds(net, inputs, device))
            if progress is not None:
                progress(r + 1, repeats)
    else:
        runners: dict[tuple[str, str], nn.Module] = {}
        applied_copies: list[_Applied] = []
        for spec in specs:  # each method stays applied on its own weight-sharing copy
            copy_ = _clone_sharing_weights(net)
            applied_copies.append(_Applied(copy_, spec, max_downsample=max_downsample, blocks=blocks,
                                           inputs=inputs).__enter__())
            for mode in modes:
                runner = _compiled(copy_, mode, compile_backend)
                if mode != "none":
                    compile_s[(spec.label, mode)] = _first_compiled_call(runner, inputs, device, freeze=freeze)
                for _ in range(max(warmup, 2 if mode == "reduce-overhead" else 0)):  # CUDA graph recording
                    _forward_seconds(runner, inputs, device)
                runners[(spec.label, mode)] = runner
        try:
            for r in range(repeats):  # interleaved timing rounds: every method, every mode
                for spec in specs:
                    for mode in modes:
                        times[(spec.label, mode)].append(_forward_seconds(runners[(spec.label, mode)], inputs, device))
                if progress is not None:
                    progress(r + 1, repeats)
            for spec, applied in zip(specs, applied_copies):  # counts traced into the compiled graphs
                if applied.handle is not None:
                    traced_kept[spec.label] = json.dumps(applied.handle.tokens_kept())
        finally:
            for applied in applied_copies:
                applied.__exit__(None, None, None)
    out = []
    for mode in modes:
        base = statistics.median(times[(specs[0].label, mode)])
        for spec in specs:
            ts = sorted(times[(spec.label, mode)])
            med = statistics.median(ts)
            q1, q3 = (ts[len(ts) // 4], ts[(3 * len(ts)) // 4]) if len(ts) >= 4 else (ts[0], ts[-1])
            row = dict(rows[spec.label])
            if mode != "none" and spec.label in traced_kept:
                row["tokens_kept"] = traced_kept[spec.label]
            out.append({**row, "compile": mode, "median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3,
                        "min_ms": ts[0] * 1e3, "speedup": base / med,
                        "vs_eager": statistics.median(times[(spec.label, "none")]) / med if "none" in modes else None,
                        "compile_s": compile_s.get((spec.label, mode))})
    info.update({"resolution": resolution, "batch_size": batch_size, "dtype": dtype, "device": device,
                 "repeats": repeats, "warmup": warmup, "max_downsample": max_downsample,
                 "compile_modes": modes, "compile_backend": compile_backend if modes != ["none"] else None,
                 "freeze": bool(freeze) if modes != ["none"] else None,
                 "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else _cpu_name(),
                 "torch": torch.__version__, "threads": torch.get_num_threads()})
    return pd.DataFrame(out), info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _present(value: Any) -> bool:
    return value is not None and value == value  # NaN marks a missing value in a DataFrame


def format_table(df, info: dict[str, Any]) -> str:
    """A markdown table of a :func:`run_bench` result, with the setting above it."""
    head = (f"{info['model']} ({info['source']}), {info['resolution']}x{info['resolution']}, batch "
            f"{info['batch_size']}, {info['dtype']}, {info['device']} ({info['device_name']}), "
            f"{info['repeats']} interleaved repeats after {info['warmup']} warm-up")
    compiled = info.get("compile_modes", ["none"]) != ["none"]
    if compiled:
        head += f"; compiled with torch.compile (backend {info.get('compile_backend')}"
        head += ", weights frozen)" if info.get("freeze") else ")"
        lines = [head, "", "speedup: against `none` in the same compile mode; vs eager: against the same method run "
                 "eagerly; compile s: the first compiled call (not timed).", "",
                 "| method | compile | median ms | IQR ms | speedup | vs eager | compile s | GFLOPs | peak MB | "
                 "tokens kept (q / kv) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    else:
        lines = [head, "", "| method | median ms | IQR ms | speedup | GFLOPs | peak MB | tokens kept (q / kv) |",
                 "|---|---:|---:|---:|---:|---:|---|"]
    for r in df.to_dict("records"):
        kept = json.loads(r["tokens_kept"]) if r["tokens_kept"] else {}
        kept_s = "; ".join(f"L{lvl}: {v['queries']:.2f} / {v['keys_values']:.2f}" for lvl, v in kept.items()) or "-"
        gf = f"{r['gflops']:.4g}" if r["gflops"] is not None else "-"
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        if compiled:
            vs = f"{r['vs_eager']:.3f}" if _present(r.get("vs_eager")) else "-"
            cs = f"{r['compile_s']:.1f}" if _present(r.get("compile_s")) else "-"
            lines.append(f"| {r['method']} | {r['compile']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                         f"{r['speedup']:.3f} | {vs} | {cs} | {gf} | {mem} | {kept_s} |")
        else:
            lines.append(f"| {r['method']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['speedup']:.3f} | {gf} | "
                         f"{mem} | {kept_s} |")
    return "\n".join(lines)


def classifier_overhead(*, backbone: str = "toy", backbone_options: dict | None = None, compressor: str = "none",
                        images: int = 10, batch_size: int = 32, n_samples=(5, 20), to_keep=(5, 1),
                        image_size: int | None = None) -> dict[str, float]:
    """The classifier's wall time against (denoiser calls x one forward's time at the same batch sizes).

    ``overhead = wall / expected - 1``: the time spent outside the denoiser (noising, losses,
    bookkeeping, encoding).
    """
    from bigain.datamodules.toy import ToyDataModule
    from bigain.tasks.adaptive import image_noise
    from bigain.tasks.classification import DiffusionClassifier

    module = DiffusionClassifier(backbone=backbone, backbone_options=backbone_options, compressor=compressor,
                                 n_samples=list(n_samples), to_keep=list(to_keep), batch_size=batch_size)
    module.configure_model()
    dm = ToyDataModule(length=images, image_size=image_size or 32)
    dm.setup()
    module.num_classes, module.multilabel = dm.num_classes, False
    module.backbone.set_classes(prompts=dm.prompts, label_ids=dm.label_ids)
    calls: dict[int, int] = {}
    original = module._predict

    def counting(x_t, t, classes):
        calls[len(classes)] = calls.get(len(classes), 0) + 1
        return original(x_t, t, classes)

    module._predict = counting
    first = dm.dataset[0]
    module.classify(first["image"], first["index"], first["label"])  # warm-up
    calls.clear()
    t0 = time.perf_counter()
    for i in range(len(dm.dataset)):
        item = dm.dataset[i]
        module.classify(item["image"], item["index"], item["label"])
    wall = time.perf_counter() - t0
    x0 = module.backbone.encode(first["image"][None])[0]
    noise = image_noise(0, 0, module.schedule, tuple(x0.shape))
    expected = 0.0
    for size, count in calls.items():
        x_t = noise[:1].expand(size, *x0.shape).contiguous()
        t = torch.full((size,), 500)
        cls = torch.zeros(size, dtype=torch.long)
        with torch.no_grad():
            original(x_t, t, cls)
            samples = []
            for _ in range(5):
                s = time.perf_counter()
                original(x_t, t, cls)
                samples.append(time.perf_counter() - s)
        expected += count * statistics.median(samples)
    return {"images": len(dm.dataset), "wall_s": wall, "denoiser_s": expected,
            "overhead": wall / expected - 1.0, "calls": sum(calls.values())}
