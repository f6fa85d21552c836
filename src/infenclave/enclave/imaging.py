"""Decode untrusted image bytes and turn them into a model input.

This module runs inside the enclave on user data, so it parses defensively: the encoded size
and the pixel count are bounded *before* any pixel is decoded (a 30000x30000 PNG is refused
from its header), truncated files are errors, and every colour mode is converted to 8-bit RGB
explicitly. The same code serves `infenclave predict` on the host side, so that plain and
confidential predictions see exactly the same pixels.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFile

from infenclave.errors import ImageError, ModelError

MAX_ENCODED_BYTES = 32 * 1024 * 1024  # a large phone photo is ~10 MiB
MAX_PIXELS = 64_000_000  # 8000x8000; decompression bombs are refused from the header
MIN_SIDE = 8  # smaller images carry no usable content and break centre crops
MAX_ASPECT = 32.0  # panoramas beyond this would be cropped to a sliver
MAX_RESIZE = 4096  # model inputs are a few hundred pixels; bounds the resized copy's memory
MAX_NORM_VALUE = 1e4  # mean/std in 0-255 pixel units
MIN_STD = 1e-3  # a smaller std turns pixel noise into huge inputs (0 into infinities)

# Never guess pixels of a truncated file; never let PIL's own bomb check warn instead of refuse.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: resize, centre crop, normalise, lay out.

    `mean` and `std` are in 0-255 pixel units and in `channel_order`.
    """

    resize: int | tuple[int, int]
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    def __post_init__(self) -> None:
        # A manifest is host-stored data: bounded values keep a hostile one from asking the
        # enclave for a 100000-px resize (memory) or a zero std (infinities into the FrontNet).
        sides = self.resize if isinstance(self.resize, tuple) else (self.resize,)
        if len(sides) not in (1, 2) or not all(_is_side(s) for s in sides):
            raise ModelError(f"preprocess: resize must be 1 or 2 sizes in {MIN_SIDE}..{MAX_RESIZE}")
        if self.crop is not None and (not _is_side(self.crop) or self.crop > min(sides)):
            raise ModelError("preprocess: crop must be a size no larger than the resize")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(math.isfinite(v) and abs(v) <= MAX_NORM_VALUE for v in values):
                raise ModelError(f"preprocess: {name} must be 3 finite numbers within ±{MAX_NORM_VALUE:g}")
        if min(abs(v) for v in self.std) < MIN_STD:
            raise ModelError(f"preprocess: std values must be at least {MIN_STD:g} in magnitude")
        if self.channel_order not in ("RGB", "BGR") or self.layout not in ("NCHW", "NHWC"):
            raise ModelError("preprocess: channel_order must be RGB or BGR, layout NCHW or NHWC")

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of the tensor the model receives."""
        if self.crop is not None:
            return (self.crop, self.crop)
        if isinstance(self.resize, tuple):
            return self.resize
        raise ValueError("a square resize without crop has no fixed input size")

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        resize = d["resize"]
        return cls(
            resize=tuple(resize) if isinstance(resize, list) else resize,
            crop=d.get("crop"),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            channel_order=d.get("channel_order", "RGB"),
            layout=d.get("layout", "NCHW"),
        )


def _is_side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and MIN_SIDE <= value <= MAX_RESIZE


#: The only image formats the service accepts. Pillow otherwise tries every decoder it has
#: (TIFF, EPS, PSD, ICO, ...) on untrusted bytes inside the enclave; naming the formats keeps
#: the decoders that ever see a client's bytes to these three.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, draft_side: int | None = None) -> np.ndarray:
    """Decode encoded image bytes into an (H, W, 3) uint8 RGB array, or raise ImageError.

    *max_pixels* may only lower `MAX_PIXELS` (it comes from the untrusted host: availability,
    never confidentiality). With *draft_side*, a JPEG is decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling) as long as its short side stays >= *draft_side*.
    """
    max_pixels = min(max_pixels, MAX_PIXELS)
    if len(data) > MAX_ENCODED_BYTES:
        raise ImageError(f"image is {len(data)} bytes; the limit is {MAX_ENCODED_BYTES}")
    if not data:
        raise ImageError("image is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large (limit {MAX_PIXELS} pixels)") from exc
    except Exception as exc:  # PIL raises several types for "not an image"
        raise ImageError("not a recognised image file") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height}; each side must be at least {MIN_SIDE} px")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(f"image is {width}x{height}; aspect ratio above {MAX_ASPECT:g} is refused")
    if draft_side is not None and img.format == "JPEG" and min(width, height) > 2 * draft_side:
        scale = draft_side / min(width, height)
        img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        img.load()
    except Exception as exc:
        raise ImageError("image data is truncated or corrupt") from exc
    return _to_rgb8(img)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to (H, W, 3) uint8 RGB, scaling 16/32-bit data instead of clipping."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent regions of photos are background, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_and_crop(rgb: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Resize (short side, or exact [H, W]) and centre-crop an (H, W, 3) uint8 image."""
    img = Image.fromarray(rgb)
    w, h = img.size
    if isinstance(pre.resize, tuple):
        new_h, new_w = pre.resize
    else:
        scale = pre.resize / min(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if pre.crop is not None:
        if pre.crop > min(new_w, new_h):
            raise ImageError(f"crop {pre.crop} is larger than the resized image {new_w}x{new_h}")
        left = (new_w - pre.crop) // 2
        top = (new_h - pre.crop) // 2
        img = img.crop((left, top, left + pre.crop, top + pre.crop))
    return np.asarray(img, dtype=np.uint8)


def normalise(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Map (..., H, W, 3) RGB pixel values (0-255, any float or uint8) to the model's input.

    Returns float32 in the model's layout, with a leading batch axis when given (H, W, 3).
    """
    x: np.ndarray = pixels.astype(np.float32)
    if x.ndim == 3:
        x = x[None]  # (1, H, W, 3)
    if pre.channel_order == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)  # (B, 3, H, W)
    return np.ascontiguousarray(x, dtype=np.float32)


def draft_side(pre: Preprocess) -> int:
    """The short side a JPEG may be draft-decoded down to: twice the model's resize target,
    so that the bilinear resize still averages over at least 2x2 decoded pixels (top-5 on the
    sample photos: docs/serving.md, "Bounds")."""
    return 2 * (max(pre.resize) if isinstance(pre.resize, tuple) else pre.resize)


def prepare(data: bytes, pre: Preprocess, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> model input of shape (1, 3, H, W) or (1, H, W, 3), float32."""
    return normalise(resize_and_crop(decode_image(data, max_pixels, draft_side(pre)), pre), pre)
