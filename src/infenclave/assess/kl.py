"""The KL-oracle exposure method: project feature maps to images, ask an oracle, measure KL.

For an image x with the model's prediction p = softmax(model(x)) and an intermediate
representation (IR) of C feature maps at a cut point:

1. each feature map is projected to an image the oracle can classify: min-max normalised to
   [0, 1] (a constant map becomes all zeros), resized bilinearly to the input size
   (half-pixel centres, i.e. `align_corners=False`, no antialiasing), replicated to 3 channels,
   scaled to pixel units 0-255, then normalised exactly as the oracle normalises a photo;
2. the oracle's prediction q_c on that image is compared with p: KL(p || q_c);
3. the cut is *safe for x* when min_c KL(p || q_c) > delta(x) = KL(p || uniform): no single
   feature map lets the oracle recover more of the prediction than knowing nothing would.

This module holds the pure numerics (numpy only, so they are testable against an
independent torch computation) and the oracle model; the scan loop is in `scan.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from infenclave.enclave.imaging import Preprocess, normalise
from infenclave.errors import AssessmentError
from infenclave.models.spec import LoadedModel

PIXEL_MAX = 255.0  # projected maps are scaled to 8-bit pixel units before normalisation
PROB_FLOOR = 1e-30  # only for models whose output is already probabilities: log(0) guard
CONSTANT_KEY = b"constant"  # dedup key shared by every constant map: they all project to zeros


def minmax_normalise(maps: np.ndarray) -> np.ndarray:
    """(N, h, w) feature maps -> (N, h, w) float32 in [0, 1]; a constant map becomes zeros."""
    maps = maps.astype(np.float32, copy=False)
    lo = maps.min(axis=(1, 2), keepdims=True)  # (N, 1, 1)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    out = np.zeros_like(maps)
    np.divide(maps - lo, span, out=out, where=span > 0)
    return out


@lru_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) float32 matrix R so that R @ v resizes v bilinearly along one axis.

    Same sampling as `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`
    without antialiasing: source coordinate (i + 0.5) * in / out - 0.5, clamped at 0, the
    upper neighbour clamped at the last pixel. Separable, so a 2-D resize is Ry @ M @ Rx^T:
    two small matrix products instead of a per-pixel gather.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    r = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(r, (rows, i0), 1.0 - w1)
    np.add.at(r, (rows, i1), w1)
    out = r.astype(np.float32)
    out.setflags(write=False)  # shared through the cache
    return out


def resize_bilinear(maps: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(N, h, w) float32 -> (N, H, W) float32, bilinear with half-pixel centres."""
    ry = bilinear_matrix(out_hw[0], maps.shape[1])  # (H, h)
    rx = bilinear_matrix(out_hw[1], maps.shape[2])  # (W, w)
    return np.matmul(np.matmul(ry, maps), rx.T)  # (N, H, W)


def project(unit_maps: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Min-max-normalised (N, h, w) maps -> the oracle's input batch (N, 3, H, W) or (N, H, W, 3).

    The caller normalises first (`minmax_normalise`) because the normalised map is also the
    deduplication key: two maps equal after normalisation give the same oracle input.
    """
    pixels = resize_bilinear(unit_maps, pre.input_hw) * PIXEL_MAX  # (N, H, W) in 0-255
    rgb = np.repeat(pixels[..., None], 3, axis=-1)  # (N, H, W, 3): a grey image
    return normalise(rgb, pre)


def map_key(unit_map: np.ndarray) -> bytes:
    """Deduplication key of one normalised (h, w) map: equal keys give equal oracle inputs."""
    if not unit_map.any():
        return CONSTANT_KEY  # every constant map, at any size, projects to the same zeros
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(unit_map.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(unit_map).tobytes())
    return h.digest()


def log_probs(scores: np.ndarray, output: str) -> np.ndarray:
    """(B, K) model outputs -> (B, K) float64 log-probabilities (log-softmax of logits)."""
    s = scores.astype(np.float64)
    if output == "probabilities":
        s = np.maximum(s, PROB_FLOOR)
        return np.log(s / s.sum(axis=-1, keepdims=True))
    z = s - s.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats along the last axis; broadcasts (K,) against (B, K)."""
    p = np.exp(log_p)
    return np.sum(p * (log_p - log_q), axis=-1)


def kl_to_uniform(log_p: np.ndarray) -> np.ndarray:
    """delta = KL(p || uniform) = log K - H(p): how far p is from knowing nothing."""
    k = log_p.shape[-1]
    return kl_divergence(log_p, np.full(log_p.shape, -np.log(k)))


@dataclass
class Oracle:
    """The classifier that judges projected feature maps, run whole on ONNX Runtime.

    By default the assessed model itself. Its own normalisation is applied to the projected
    pixels (the projection is in pixel units precisely so that any oracle can take it).
    """

    model: LoadedModel
    onnx_bytes: bytes
    same_as_model: bool

    @property
    def preprocess(self) -> Preprocess:
        return self.model.preprocess

    @property
    def output(self) -> str:
        return self.model.output

    def identity(self) -> dict[str, object]:
        return {**self.model.identity(), "same_as_model": self.same_as_model}


def make_oracle(model: LoadedModel, oracle: LoadedModel | None) -> Oracle:
    """The oracle for `model`: itself, or `oracle` after checking it can judge this model.

    KL(p || q) needs p and q over the same classes, and the projection is made at the model's
    input size, so both must match; anything else is refused rather than silently resized.
    """
    from infenclave.network import analyse

    if oracle is None:
        return Oracle(model=model, onnx_bytes=analyse(model).onnx_bytes(), same_as_model=True)
    try:
        want_hw, got_hw = model.preprocess.input_hw, oracle.preprocess.input_hw
    except ValueError as exc:
        raise AssessmentError(f"oracle {oracle.name}: no fixed input size ({exc})") from exc
    if want_hw != got_hw:
        raise AssessmentError(
            f"oracle {oracle.name} takes {got_hw[0]}x{got_hw[1]} inputs but {model.name} takes "
            f"{want_hw[0]}x{want_hw[1]}: the oracle must have the same input size")
    if oracle.num_classes != model.num_classes:
        raise AssessmentError(
            f"oracle {oracle.name} has {oracle.num_classes} labels but {model.name} has "
            f"{model.num_classes}: KL needs both predictions over the same classes")
    same = (oracle.name, oracle.weights_sha256) == (model.name, model.weights_sha256)
    return Oracle(model=oracle, onnx_bytes=analyse(oracle).onnx_bytes(), same_as_model=same)
