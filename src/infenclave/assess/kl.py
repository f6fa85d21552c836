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

from infenclave.enclave.imaging import Preprocess
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
    """(N, h, w) float32 -> (N, H, W) float32, bilinear with half-pixel centres.

    The width pass is one GEMM over all maps; the height pass one GEMM per map into a
    preallocated output. (A broadcast `np.matmul` over the stack was 50x slower here.)
    """
    n, h, w = maps.shape
    ry = bilinear_matrix(out_hw[0], h)  # (H, h)
    rx_t = bilinear_matrix(out_hw[1], w).T  # (w, W)
    rows = np.ascontiguousarray(maps, np.float32).reshape(n * h, w) @ rx_t  # (N*h, W)
    rows = rows.reshape(n, h, out_hw[1])
    out = np.empty((n, *out_hw), np.float32)
    for i in range(n):
        np.matmul(ry, rows[i], out=out[i])  # (H, h) @ (h, W)
    return out


def normalise_grey(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """(N, H, W) grey pixel values -> the model input of the same image replicated to 3 channels.

    Exactly `imaging.normalise(np.repeat(pixels[..., None], 3, -1), pre)` (same float32
    operations, so the same bits; a test holds it to that), written straight into the
    model's layout: 3x less memory traffic, and no transpose, on the scan's hot path.
    """
    n, hh, ww = pixels.shape
    x = pixels.astype(np.float32, copy=False)
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    # Every channel of a grey image holds the same value, so channel order only decides
    # which mean/std goes with which output channel: normalise flips the pixels, then
    # applies mean[c]/std[c] to channel c, so output channel c is (x - mean[c]) / std[c].
    if pre.layout == "NCHW":
        out = np.empty((n, 3, hh, ww), np.float32)
        planes = [out[:, c] for c in range(3)]
    else:
        out = np.empty((n, hh, ww, 3), np.float32)
        planes = [out[..., c] for c in range(3)]
    for c, plane in enumerate(planes):
        if c and mean[c] == mean[c - 1] and std[c] == std[c - 1]:
            plane[...] = planes[c - 1]
            continue
        np.subtract(x, mean[c], out=plane)
        np.divide(plane, std[c], out=plane)
    return out


def project(unit_maps: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Min-max-normalised (N, h, w) maps -> the oracle's input batch (N, 3, H, W) or (N, H, W, 3).

    The caller normalises first (`minmax_normalise`) because the normalised map is also the
    deduplication key: two maps equal after normalisation give the same oracle input.
    """
    pixels = resize_bilinear(unit_maps, pre.input_hw) * np.float32(PIXEL_MAX)  # (N, H, W) 0-255
    return normalise_grey(pixels, pre)  # = normalise() of the 3-channel grey image


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
        return np.asarray(np.log(s / s.sum(axis=-1, keepdims=True)))
    z = s - s.max(axis=-1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=-1, keepdims=True)))


def kl_divergence(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats along the last axis; broadcasts (K,) against (B, K)."""
    p = np.exp(log_p)
    return np.asarray(np.sum(p * (log_p - log_q), axis=-1))


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
    # True when the oracle has other classes than the model (an ImageNet oracle for a model
    # with few classes): p is then the oracle's own prediction on the original photo.
    own_reference: bool = False
    note: str | None = None  # which oracle and why, for the plan

    @property
    def preprocess(self) -> Preprocess:
        return self.model.preprocess

    @property
    def output(self) -> str:
        return self.model.output

    def identity(self) -> dict[str, object]:
        return {**self.model.identity(), "same_as_model": self.same_as_model}


# With K classes delta = KL(p || uniform) <= log K: 0.69 nats for K = 2, so nearly any projected
# map that the model puts in the photo's class comes within delta and the method calls every
# cut unsafe (an independent review saw exactly that on a 2-class ONNX ResNet-50). Below
# FEW_CLASSES an ImageNet oracle of the same input size judges instead, against its *own*
# prediction on the original photo: it asks "does this map still show what the photo shows?"
# over 1000 classes, where delta is up to log 1000 = 6.9 nats.
FEW_CLASSES = 10
IMAGENET_ORACLES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def make_oracle(model: LoadedModel, oracle: LoadedModel | None) -> Oracle:
    """The oracle for `model`: itself, `oracle` after checking it can judge this model, or for a
    model with fewer than FEW_CLASSES classes an ImageNet zoo model of the same input size.

    KL(p || q) needs p and q over the same classes, and the projection is made at the model's
    input size, so the size must match; a different class set is accepted only from an oracle
    with more classes, which then judges against its own prediction on the photo.
    """
    from infenclave.network import analyse

    if oracle is None and model.num_classes < FEW_CLASSES:
        oracle = _imagenet_oracle(model)
        if oracle is None:
            return Oracle(
                model=model,
                onnx_bytes=analyse(model).onnx_bytes(),
                same_as_model=True,
                note=f"{model.name} has {model.num_classes} classes and no ImageNet zoo "
                "model takes its input size: the model judges itself, and the KL "
                "method is weak here (delta <= log K)",
            )
    if oracle is None:
        return Oracle(model=model, onnx_bytes=analyse(model).onnx_bytes(), same_as_model=True)
    try:
        want_hw, got_hw = model.preprocess.input_hw, oracle.preprocess.input_hw
    except ValueError as exc:
        raise AssessmentError(f"oracle {oracle.name}: no fixed input size ({exc})") from exc
    if want_hw != got_hw:
        raise AssessmentError(
            f"oracle {oracle.name} takes {got_hw[0]}x{got_hw[1]} inputs but {model.name} takes "
            f"{want_hw[0]}x{want_hw[1]}: the oracle must have the same input size"
        )
    own = oracle.num_classes != model.num_classes
    if own and oracle.num_classes < model.num_classes:
        raise AssessmentError(
            f"oracle {oracle.name} has {oracle.num_classes} labels but {model.name} has "
            f"{model.num_classes}: an oracle with other classes must have more (it then judges "
            "against its own prediction on each photo)"
        )
    same = (oracle.name, oracle.weights_sha256) == (model.name, model.weights_sha256)
    note = (
        f"{model.name} has {model.num_classes} classes, so KL(p || uniform) is at most "
        f"{np.log(model.num_classes):.2f} nats and nearly every map would look revealing; "
        f"the ImageNet model {oracle.name} ({oracle.num_classes} classes) judges each "
        "projected map against its own prediction on the original photo instead."
        if own
        else None
    )
    return Oracle(
        model=oracle, onnx_bytes=analyse(oracle).onnx_bytes(), same_as_model=same, own_reference=own, note=note
    )


def _imagenet_oracle(model: LoadedModel) -> LoadedModel | None:
    """The first ImageNet zoo model with `model`'s input size (None when none has it)."""
    from infenclave.models import load_model, zoo

    for name in IMAGENET_ORACLES:
        cand = load_model(name)
        if cand.preprocess.input_hw == model.preprocess.input_hw and name in zoo.ZOO:
            return cand
    return None
