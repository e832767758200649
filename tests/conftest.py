import os
import textwrap

import pytest
import torch

# Keep runs reproducible and light on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def unet():
    from bigain.testing import tiny_unet

    return tiny_unet(0)


@pytest.fixture
def dit():
    from bigain.testing import tiny_dit

    return tiny_dit(0)


_KILLER = textwrap.dedent("""
    import os
    from lightning.pytorch.callbacks import Callback

    class KillAfter(Callback):
        def __init__(self, batches: int = 2):
            self.batches = batches

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx + 1 >= self.batches:
                os._exit(3)  # like SIGKILL: no cleanup, no final merge
""")


@pytest.fixture
def kill_after(tmp_path):
    """``kill_after(batches) -> (config, env)``: a Lightning config adding a callback that ends the process
    with ``os._exit(3)`` (no cleanup, like SIGKILL) after ``batches`` predict batches, and the environment
    that lets a ``bigain`` subprocess import the callback. Pass ``--config config`` to the command."""

    def make(batches: int) -> tuple[str, dict]:
        (tmp_path / "killer.py").write_text(_KILLER)
        config = tmp_path / "kill.yaml"
        config.write_text(f"trainer:\n  callbacks:\n    - class_path: killer.KillAfter\n"
                          f"      init_args: {{batches: {batches}}}\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
        return str(config), env

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded: on a busy 2-core machine a second thread only adds
    waiting. A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
