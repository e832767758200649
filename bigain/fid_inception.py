"""The Inception-v3 network FID is defined on, in the form ``pytorch-fid`` publishes its weights for.

FID's reference network is the 2015-12-05 TensorFlow Inception graph. ``pytorch-fid`` ships it as a
PyTorch state dict for torchvision's ``Inception3`` (1008 classes, no auxiliary head:
``pt_inception-2015-12-05-6726825d.pth``), with four blocks changed to match the TensorFlow graph:

* the average-pooling branch of every ``InceptionA`` (``Mixed_5b``-``5d``), ``InceptionC``
  (``Mixed_6b``-``6e``) and the first ``InceptionE`` (``Mixed_7b``) leaves the zero padding out of
  its averages (``count_include_pad=False``);
* the pooling branch of the last ``InceptionE`` (``Mixed_7c``) takes a 3x3 *max* instead of the mean.

Images enter as floats in ``[0, 1]``, are resized to 299 x 299 (bilinear, ``align_corners=False``),
scaled to ``[-1, 1]``, and the features are the 2048 averages after ``Mixed_7c`` (``pool3``).
This module builds that network from torchvision's blocks; it does not need ``pytorch-fid`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception as tv

from bigain.errors import ConfigError

__all__ = ["PYTORCH_FID_WEIGHTS", "PYTORCH_FID_URL", "FIDInceptionV3", "load_pytorch_fid_inception"]

#: The file name ``pytorch-fid`` publishes its Inception weights under.
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
#: Where ``pytorch-fid`` publishes them (download it on a machine with network access).
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_WEIGHTS}"


def _avg_exclude_pad(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _repooled(block: type[nn.Module], pool: Callable[[Tensor], Tensor], name: str) -> type[nn.Module]:
    """``block`` with its pooling branch (the last output, ``branch_pool``) fed by ``pool``."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        outputs = block._forward(self, x)
        outputs[-1] = self.branch_pool(pool(x))
        return outputs

    return type(name, (block,), {"_forward": _forward, "__doc__": f"{block.__name__}, FID's pooling branch"})


FIDInceptionA = _repooled(tv.InceptionA, _avg_exclude_pad, "FIDInceptionA")
FIDInceptionC = _repooled(tv.InceptionC, _avg_exclude_pad, "FIDInceptionC")
FIDInceptionE1 = _repooled(tv.InceptionE, _avg_exclude_pad, "FIDInceptionE1")
FIDInceptionE2 = _repooled(tv.InceptionE, _max, "FIDInceptionE2")


class FIDInceptionV3(nn.Module):
    """uint8-free FID network: float images ``[B, 3, H, W]`` in ``[0, 1]`` -> pool3 features ``[B, 2048]``.

    ``net`` is torchvision's ``Inception3`` with the FID blocks; its ``state_dict`` has exactly the
    keys of ``pytorch-fid``'s weights file.
    """

    def __init__(self) -> None:
        super().__init__()
        net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE1(1280)
        net.Mixed_7c = FIDInceptionE2(2048)
        self.net = net

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """Float images in ``[0, 1]`` (any size) -> the network's 299 x 299 input in ``[-1, 1]``."""
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, images: Tensor) -> Tensor:
        n = self.net
        x = self.prepare(images)
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool):
            x = layer(x)
        return x.flatten(1)


def load_pytorch_fid_inception(path: str | Path) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with ``pytorch-fid``'s weights from the local file ``path``.

    Raises:
        ConfigError: the file does not exist, cannot be read as a state dict, or holds the weights
            of another network (the message lists the first mismatched keys).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"pytorch-fid's Inception weights are not at {path}: download {PYTORCH_FID_WEIGHTS} "
                          f"from {PYTORCH_FID_URL} on a machine with network access and give its local path "
                          f"(feature_extractor: pytorch-fid:/path/to/{PYTORCH_FID_WEIGHTS})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"could not read {path} as a PyTorch state dict ({type(exc).__name__}: {exc}); "
                          f"give pytorch-fid's {PYTORCH_FID_WEIGHTS}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict; give pytorch-fid's "
                          f"{PYTORCH_FID_WEIGHTS}")
    model = FIDInceptionV3()
    expected = model.net.state_dict()
    # BatchNorm's step counters are not weights (files saved without them load all the same)
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{path} is not pytorch-fid's Inception ({PYTORCH_FID_WEIGHTS}): "
            f"{len(missing)} keys missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(shapes)} of another shape {shapes[:3]}"
        )
    model.net.load_state_dict(state, strict=False)  # checked above: at most the step counters are absent
    return model.eval().requires_grad_(False)
