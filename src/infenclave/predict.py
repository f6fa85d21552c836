"""Plain (non-confidential) prediction: the baseline every confidential result is compared to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infenclave.enclave.imaging import prepare
from infenclave.enclave.onnx_runner import OnnxPart
from infenclave.enclave.topk import Prediction, top_k
from infenclave.errors import ImageError
from infenclave.models.spec import LoadedModel
from infenclave.network import analyse
from infenclave.protocol.files import read_bounded

MAX_IMAGE_FILE_BYTES = 32 * 1024 * 1024


def read_image_file(path: Path) -> bytes:
    """Read an image file with a size limit, turning OS errors into one clear ImageError."""
    return read_bounded(path, MAX_IMAGE_FILE_BYTES, "image file", ImageError)


@dataclass
class Predictor:
    """The whole model on ONNX Runtime, exactly as the parts will run, in one piece."""

    model: LoadedModel

    def __post_init__(self) -> None:
        self._part = OnnxPart(analyse(self.model).onnx_bytes())

    def scores(self, image_bytes: bytes) -> np.ndarray:
        return self._part(prepare(image_bytes, self.model.preprocess))[0]

    def predict(self, image_bytes: bytes, k: int = 5) -> list[Prediction]:
        return top_k(
            self.scores(image_bytes), self.model.labels, k, already_probabilities=self.model.output == "probabilities"
        )


def predict_files(model: LoadedModel, paths: list[Path], k: int) -> list[list[Prediction]]:
    """Top-k for each file; every file is read and decoded before any result is returned."""
    images = [read_image_file(p) for p in paths]
    predictor = Predictor(model)
    results = []
    for path, data in zip(paths, images):
        try:
            results.append(predictor.predict(data, k))
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from exc
    return results
