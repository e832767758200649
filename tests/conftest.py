import os

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
