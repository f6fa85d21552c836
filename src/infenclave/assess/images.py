"""The sample photos of an assessment: the built-in set, or the user's files and folders.

Every file is read and decoded before the (slow) model work starts, so that a bad image is
one clear error in the first second, not after minutes of scanning.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infenclave.assess.scan import AssessImage
from infenclave.enclave.imaging import Preprocess, decode_image, resize_and_crop
from infenclave.errors import ImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_IMAGES = 128  # every image's IRs at every cut are kept in memory (~4 MB each for Lite0)


@dataclass(frozen=True)
class DecodedImage:
    """A photo decoded at full size, not yet fitted to a model."""

    name: str
    source: str
    sha256: str
    rgb: np.ndarray  # (H, W, 3) uint8

    def fitted(self, pre: Preprocess) -> AssessImage:
        return AssessImage(
            name=self.name, source=self.source, sha256=self.sha256, pixels=resize_and_crop(self.rgb, pre)
        )


def builtin_sources() -> list[tuple[str, str, Path]]:
    from infenclave.sample_images import builtin_images

    return [(name, f"builtin:{name}", path) for name, path in builtin_images().items()]


def expand(paths: list[Path]) -> list[tuple[str, str, Path]]:
    """Files and folders (their image files, sorted, not recursive) -> (name, source, path)."""
    found: list[tuple[str, str, Path]] = []
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ImageError(f"{p}: no image files in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            found.extend((f.stem, str(f), f) for f in files)
        elif p.exists():
            found.append((p.stem, str(p), p))
        else:
            raise ImageError(f"{p}: no such file or folder")
    return found


def load_images(paths: list[Path] | None) -> list[DecodedImage]:
    """Read and decode the assessment's photos (`None`: the built-in set)."""
    from infenclave.predict import read_image_file

    sources = builtin_sources() if paths is None else expand(paths)
    if not sources:
        raise ImageError("no images given")
    if len(sources) > MAX_IMAGES:
        raise ImageError(
            f"{len(sources)} images given; the limit is {MAX_IMAGES} "
            "(a few varied photos decide as well as many similar ones)"
        )
    images: list[DecodedImage] = []
    seen: dict[str, int] = {}
    for name, source, path in sources:
        data = read_image_file(path)
        try:
            rgb = decode_image(data)
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from exc
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name}#{seen[name]}"  # two folders, same stem
        images.append(DecodedImage(unique, source, hashlib.sha256(data).hexdigest(), rgb))
    return images
