"""``auto`` precision: bfloat16 only where the CPU computes it natively, and the run says why."""

import pytest

from bigain import precision

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
ZEN3_AVX512_LESS = "flags\t\t: avx2 avx512f avx512bw avx512vl avx512dq\n"  # AVX-512 without BF16: emulated
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, flags", [(EPYC_AVX2, []), (SAPPHIRE_RAPIDS, ["amx_bf16", "avx512_bf16"]),
                                            (ZEN3_AVX512_LESS, []), (GRAVITON3, ["bf16"])])
def test_native_bf16_flags_are_read_from_cpuinfo(cpuinfo, flags):
    assert precision.cpu_bf16_flags(cpuinfo) == flags


def test_auto_picks_float32_on_a_cpu_without_native_bf16_and_says_why(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: [])
    dtype, why = precision.auto_dtype("cpu")
    assert dtype == "float32" and "no native bfloat16" in why and "emulated" in why
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: ["amx_bf16"])
    dtype, why = precision.auto_dtype("cpu")
    assert dtype == "bfloat16" and "amx_bf16" in why
    assert precision.auto_dtype("cuda")[0] == "float32"


@pytest.mark.slow
def test_demo_auto_precision_follows_the_cpu_and_the_report_says_why(tmp_path, monkeypatch):
    import json

    from bigain.cli import main

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: [])
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "none", "--tasks", "classify", "--images", "2",
                 "--accelerator", "cpu", "--backbones", "dit"]) == 0
    report = (out / "report.md").read_text()
    assert "- precision: float32 (this CPU has no native bfloat16" in report and "emulated" in report
    meta = json.loads((out / "classify" / "toy" / "dit" / "none" / "run.json").read_text())
    assert meta["result_config"]["model"]["backbone_options"]["dtype"] == "float32"
    assert "cpu_native_bf16" in meta["device"] and meta["device"]["cpu"]
