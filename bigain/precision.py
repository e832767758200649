"""Which precision a device runs natively, for ``auto`` precision choices.

bfloat16 is only fast where the hardware computes in it: on a CPU with AMX or AVX-512 BF16
instructions (Intel Sapphire Rapids and later, AMD Zen 4 and later), an ARM CPU with the BF16
extension, or a GPU that supports it. Elsewhere PyTorch emulates bfloat16 matrix products and a
forward is several times slower than in float32, so ``auto`` picks float32 there.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["cpu_bf16_flags", "native_bf16_cpu", "auto_dtype", "cpu_description", "canonical_dtype", "DTYPE_NAMES"]

_X86_BF16 = ("amx_bf16", "avx512_bf16")

#: Every accepted spelling of a dtype -> the one bigain prints and records (PyTorch's name).
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def canonical_dtype(name: object, *, allow_auto: bool = False) -> str:
    """One spelling for a dtype: ``fp32``/``float32`` -> ``float32``, ``fp16``/``float16`` ->
    ``float16``, ``bf16``/``bfloat16`` -> ``bfloat16`` (case and a ``torch.`` prefix ignored).

    Args:
        name: the dtype as a user wrote it (a string, or a ``torch.dtype``).
        allow_auto: also accept ``auto`` (returned as is), where a command picks the dtype itself.

    Raises:
        ConfigError: for any other value, listing the accepted spellings.
    """
    from bigain.errors import ConfigError

    text = str(name).strip().lower()
    text = text[len("torch."):] if text.startswith("torch.") else text
    if allow_auto and text == "auto":
        return "auto"
    if text in DTYPE_NAMES:
        return DTYPE_NAMES[text]
    accepted = "float32 (or fp32), float16 (fp16), bfloat16 (bf16)" + (", auto" if allow_auto else "")
    raise ConfigError(f"dtype must be one of {accepted}; got {name!r}")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native-bfloat16 feature flags (``amx_bf16``, ``avx512_bf16``, ARM ``bf16``) found.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read on Linux when not given).
    """
    if cpuinfo is None:
        if sys.platform == "darwin":
            try:
                out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                     text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return []
            return ["FEAT_BF16"] if out == "1" else []
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return [f for f in (*_X86_BF16, "bf16") if f in flags]


def native_bf16_cpu() -> bool:
    """True when this CPU computes bfloat16 natively (AMX / AVX-512 BF16 / ARM BF16)."""
    return bool(cpu_bf16_flags())


def cpu_description() -> str:
    """The CPU's model and the SIMD level PyTorch uses on it, e.g. ``AMD EPYC 7B13, AVX2``."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return f"{name}, {capability}"


def auto_dtype(device: str) -> tuple[str, str]:
    """The dtype to run a model in on ``device`` (``cpu`` or ``cuda``), and why.

    Returns:
        ``(dtype, reason)``: ``"bfloat16"`` on a CPU with native bfloat16, ``"float32"`` on any other
        CPU and on GPUs (the toy model is small enough that float32 costs nothing there).
    """
    if device.startswith("cuda"):
        return "float32", "on a GPU, float32 costs the toy model next to nothing"
    flags = cpu_bf16_flags()
    if flags:
        return "bfloat16", f"this CPU computes bfloat16 natively: {', '.join(flags)}"
    return "float32", (f"this CPU has no native bfloat16 ({cpu_description()}; no AMX or AVX-512 BF16): bfloat16 "
                       f"would be emulated, several times slower")
