"""How much of a photo an attacker got back: pixel similarity and recognisability by a judge.

Pixel metrics (SSIM, PSNR) compare the reconstruction with the photo the model saw (the
resized, centre-cropped input, not the file). They under-rate what a person recognises: a
blurry, off-colour reconstruction of a cat scores SSIM 0.1 and is still plainly a cat. So the
main measure is **recognisability**: an independent judge network, by default a *different*
zoo model than the one assessed (so that the attack cannot succeed by producing an adversarial
pattern that only the assessed network's own features respond to), classifies both images; the
reconstruction is recognised when the judge's top-1 class for the original is among its top-5
for the reconstruction. The KL divergence between the judge's two softmax outputs is a graded
version of the same question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infenclave.enclave.imaging import normalise, resize_and_crop
from infenclave.enclave.topk import softmax
from infenclave.errors import AssessmentError
from infenclave.models.spec import LoadedModel

RECOGNITION_TOP_K = 5  # the usual ImageNet "top-5": near-synonym classes (tabby/tiger cat) count
KL_EPS = 1e-12  # floor on probabilities so that KL stays finite when the judge is certain

# Which zoo model judges which: the next-larger Lite model where there is one, else the
# next-smaller one. A bigger, differently trained-resolution network shares the fewest
# idiosyncratic features with the assessed one.
_DEFAULT_JUDGE = {
    "efficientnet-lite0": "efficientnet-lite2",
    "efficientnet-lite1": "efficientnet-lite2",
    "efficientnet-lite2": "efficientnet-lite1",
}
FALLBACK_JUDGE = "efficientnet-lite2"  # for user models: any ImageNet zoo model is independent
# The panel: at least two judges, each a different zoo model than the assessed one. No other
# ImageNet architecture ships offline here (torchvision/timm do not run beside the CPU torch
# wheel), so the panel is two Lite models of different width, depth and input size.
_DEFAULT_PANEL = {
    "efficientnet-lite0": ("efficientnet-lite2", "efficientnet-lite1"),
    "efficientnet-lite1": ("efficientnet-lite2", "efficientnet-lite0"),
    "efficientnet-lite2": ("efficientnet-lite1", "efficientnet-lite0"),
}
FALLBACK_PANEL = ("efficientnet-lite2", "efficientnet-lite1")
MIN_JUDGES = 2


def ssim(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean SSIM of two (H, W, 3) uint8 images (skimage, 7x7 windows, per channel, averaged)."""
    from skimage.metrics import structural_similarity

    _check_pair(original, reconstruction)
    value = structural_similarity(  # type: ignore[no-untyped-call]
        original, reconstruction, channel_axis=-1, data_range=255
    )
    return float(value)


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two (H, W, 3) uint8 images; inf when identical."""
    _check_pair(original, reconstruction)
    mse = float(np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(255.0**2 / mse))


def tiny_image(original: np.ndarray, side: int) -> np.ndarray:
    """The photo reduced to side x side pixels (box filter) and enlarged back (bicubic)."""
    from PIL import Image

    h, w = original.shape[:2]
    small = Image.fromarray(original).resize((side, side), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)


def kl_of_probabilities(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats of two probability vectors (p: judge on the original).

    Not `infenclave.assess.kl_divergence`, which takes log-probabilities (the scan's form).
    """
    p = np.clip(p.astype(np.float64), KL_EPS, None)
    q = np.clip(q.astype(np.float64), KL_EPS, None)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise AssessmentError(f"cannot compare images of shapes {a.shape} and {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise AssessmentError("image metrics take uint8 images (what a person would see)")


def default_judge_name(assessed: str) -> str:
    """The zoo model that judges `assessed` by default: never the assessed model itself."""
    return _DEFAULT_JUDGE.get(assessed, FALLBACK_JUDGE)


def default_panel_names(assessed: str) -> tuple[str, ...]:
    """The judges of `assessed` by default, first one also the re-identification featuriser."""
    return _DEFAULT_PANEL.get(assessed, FALLBACK_PANEL)


@dataclass(frozen=True)
class Recognition:
    """What the judge says about one (original, reconstruction) pair."""

    original_top1: int
    original_top1_label: str
    original_top1_prob: float
    reconstruction_top5: tuple[int, ...]
    reconstruction_top5_labels: tuple[str, ...]
    recognised: bool  # the original's top-1 is in the reconstruction's top-5
    rank: int  # 1-based rank of the original's top-1 class for the reconstruction
    kl: float  # KL(judge(original) || judge(reconstruction)), nats


class Judge:
    """An independent classifier that says whether a reconstruction shows what the photo shows.

    The judge sees both images through its own preprocessing (resize and centre crop of the
    assessed model's input-sized image), on ONNX Runtime.
    """

    def __init__(self, model: LoadedModel, *, threads: int = 0) -> None:
        from infenclave.enclave.onnx_runner import OnnxPart
        from infenclave.network import analyse

        self.model = model
        self._net = analyse(model)
        self._part = OnnxPart(self._net.onnx_bytes(), threads=threads)
        self._threads = threads
        self._front: Any = None

    @classmethod
    def for_model(cls, assessed: LoadedModel, judge: str | None = None) -> Judge:
        """Load the judge named `judge`, or the default for `assessed`; refuse the assessed model."""
        from infenclave.models import load_model

        name = judge or default_judge_name(assessed.name)
        model = load_model(name)
        if model.weights_sha256 == assessed.weights_sha256:
            raise AssessmentError(
                f"the judge {name!r} is the assessed model itself: an attack could then succeed "
                "by fooling the assessed network's own features; choose a different judge"
            )
        return cls(model)

    @property
    def name(self) -> str:
        return self.model.name

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, classes) float64 probabilities."""
        pre = self.model.preprocess
        batch = np.stack([resize_and_crop(img, pre) for img in images])  # (B, h, w, 3)
        out = np.concatenate(
            [self._part(normalise(batch[i : i + 16], pre)) for i in range(0, len(batch), 16)]
        )  # (B, classes)
        if self.model.output == "probabilities":
            return out.astype(np.float64)
        return np.stack([softmax(row) for row in out])

    def features(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, C) globally pooled last feature map (re-identification)."""
        from infenclave.assess.attacks._front import OnnxFront

        if self._front is None:
            last = [c for c in self._net.cuts if c.is_feature_map][-1]
            self._front = OnnxFront(self._net, last.name, threads=self._threads)
        pre = self.model.preprocess
        batch = np.stack([resize_and_crop(img, pre) for img in images])
        return np.asarray(self._front(batch).mean(axis=(2, 3)), np.float64)  # (B, C, h, w) -> (B, C)

    def compare(self, p_original: np.ndarray, p_reconstruction: np.ndarray) -> Recognition:
        """Judge one pair from the two probability vectors (see `probabilities`)."""
        labels = self.model.labels
        top1 = int(np.argmax(p_original))
        order = np.argsort(-p_reconstruction, kind="stable")
        top5 = tuple(int(i) for i in order[:RECOGNITION_TOP_K])
        rank = int(np.nonzero(order == top1)[0][0]) + 1
        return Recognition(
            original_top1=top1,
            original_top1_label=labels[top1],
            original_top1_prob=float(p_original[top1]),
            reconstruction_top5=top5,
            reconstruction_top5_labels=tuple(labels[i] for i in top5),
            recognised=top1 in top5,
            rank=rank,
            kl=kl_of_probabilities(p_original, p_reconstruction),
        )


class JudgePanel:
    """At least MIN_JUDGES independent judges; a reconstruction is recognised when any one is.

    Fail closed: one judge that sees the original's class in a reconstruction is enough. A
    photo the panel itself cannot classify consistently (no judge's top-1 for the original is
    in another judge's top-5 for it) is *unclassifiable*: recognition says nothing about it,
    so it is reported apart for this signal (re-identification still counts for it).
    """

    def __init__(self, judges: Sequence[Judge]) -> None:
        if len(judges) < MIN_JUDGES:
            raise AssessmentError(f"the judge panel needs at least {MIN_JUDGES} judges")
        self.judges = list(judges)

    @classmethod
    def for_model(cls, assessed: LoadedModel, names: Sequence[str] | str | None = None) -> JudgePanel:
        """The default panel for `assessed`, or the named judges (a single name gets a second
        default judge added, so that there are always two)."""
        if isinstance(names, str):
            extra = [n for n in default_panel_names(assessed.name) if n != names]
            names = [names, *extra[: MIN_JUDGES - 1]]
        chosen = list(names or default_panel_names(assessed.name))
        return cls([Judge.for_model(assessed, n) for n in chosen])

    @property
    def names(self) -> list[str]:
        return [j.name for j in self.judges]

    def probabilities(self, images: np.ndarray) -> list[np.ndarray]:
        return [j.probabilities(images) for j in self.judges]

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.judges[0].features(images)

    @staticmethod
    def classifiable(p_originals: Sequence[np.ndarray]) -> bool:
        """Whether the judges agree on what one original shows (see the class docstring)."""
        tops = [int(np.argmax(p)) for p in p_originals]
        top5s = [set(np.argsort(-p, kind="stable")[:RECOGNITION_TOP_K].tolist()) for p in p_originals]
        return any(tops[a] in top5s[b] for a in range(len(tops)) for b in range(len(tops)) if a != b)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.judges[0].name,
            "panel": [{"name": j.name, "weights_sha256": j.model.weights_sha256} for j in self.judges],
            "weights_sha256": self.judges[0].model.weights_sha256,
        }
