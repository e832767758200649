"""The ``similarity`` option of the merging and pruning methods, and the fused kernel behind ``"fused"``.

The kernel itself is checked against the eager search in Triton's interpreter, in a fresh process
(``interpreted_fused_similarity.py``): Triton reads ``TRITON_INTERPRET`` once, when it is imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bigain
from bigain.errors import ConfigError
from bigain.plugins import _fused_similarity
from bigain.plugins._fused_similarity import interpreting, most_similar_fused

HERE = Path(__file__).parent


@pytest.mark.parametrize("name", ["tome", "bigain_tm", "sito"])
def test_blocked_is_the_default_and_unknown_searches_are_refused(name):
    assert bigain.create_compressor(name).similarity == "blocked"
    with pytest.raises(ConfigError, match="similarity must be 'blocked'"):
        bigain.create_compressor(name, similarity="triton")


def test_fused_without_triton_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(_fused_similarity, "triton", None)
    with pytest.raises(ConfigError, match="needs Triton"):
        bigain.create_compressor("tome", similarity="fused")


@pytest.mark.skipif(not _fused_similarity.fused_available(), reason="needs Triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel runs")
def test_fused_on_a_cpu_outside_the_interpreter_says_what_to_do():
    assert not interpreting()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*similarity='blocked'"):
        most_similar_fused(torch.ones(1, 2, 4), torch.ones(1, 3, 4))


def test_the_default_leaves_a_runs_identity_unchanged():
    from bigain.tasks import DiffusionClassifier

    task = DiffusionClassifier(backbone="toy", compressor="tome", compressor_options={"ratio": 0.5})
    assert "similarity" not in task.result_config()["compressor_options"]
    if _fused_similarity.fused_available():
        fused = DiffusionClassifier(backbone="toy", compressor="tome",
                                    compressor_options={"ratio": 0.5, "similarity": "fused"})
        assert fused.result_config()["compressor_options"]["similarity"] == "fused"


@pytest.mark.skipif(not _fused_similarity.fused_available(), reason="needs Triton")
def test_the_kernel_equals_the_eager_search_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HERE / "interpreted_fused_similarity.py")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not _fused_similarity.fused_available(),
                    reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_a_gpu_the_compiled_kernel_equals_the_blocked_search_without_a_sync(dtype):
    from bigain.plugins._tokens import most_similar, unit_vectors

    g = torch.Generator(device="cuda").manual_seed(0)
    a = unit_vectors(torch.randn(2, 3000, 320, device="cuda", generator=g).to(dtype))
    b = unit_vectors(torch.randn(2, 1000, 320, device="cuda", generator=g).to(dtype))
    torch.cuda.set_sync_debug_mode("error")
    try:
        values, indices = most_similar_fused(a, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = most_similar(a, b)
    assert not _fused_similarity._failed_on_cuda, _fused_similarity._failed_on_cuda
    assert torch.allclose(values, ref[0], atol=1e-4 if dtype is torch.float16 else 1e-5, rtol=0)
    assert (indices == ref[1]).float().mean() > 0.999  # the rest are near-ties
