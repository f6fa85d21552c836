"""The photos a chosen-inputs attacker trains its inverse network on: only what ships offline.

Nothing is downloaded. The attacker's photos are a curated list of real photographs from
installed packages: `scikit-image` sample data, matplotlib's sample data, and (when the Debian
packages `opencv-doc` and `imagemagick-6-doc` are installed: `scripts/system-deps.sh` installs
them) the OpenCV example images and ImageMagick's one photo: 51 distinct photos. Synthetic
test patterns, logos, renders, drawings, calibration chessboards, and the second frame of
stereo or sequence pairs are left out on purpose: they teach a decoder little about photos,
and a near-copy would inflate the count of distinct photos.

The evaluation photos are ALWAYS kept out of training, whatever the caller passes: every
candidate is compared with the built-in evaluation photos and the caller's evaluation images
by a hash of the decoded pixels (a re-encoded or renamed copy has the same pixels) and by a
near-duplicate test on a small grey thumbnail (a stereo twin, a rescaled or slightly shifted
copy). Training on the photos it is then scored on would let a decoder memorise them and make
every cut look unsafe - or, worse, would make the figures meaningless.

Augmentation (random resized crops, horizontal flips, colour jitter) turns the ~50 distinct
photos into a stream of distinct training inputs; it does not add new content, which is why
the chosen-inputs attack here is a lower bound on what an attacker with a large photo
collection achieves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from infenclave.enclave.imaging import decode_image
from infenclave.errors import AssessmentError, ImageError

OPENCV_DOC_EXAMPLES = Path("/usr/share/doc/opencv-doc/examples")
MAX_STORED_SIDE = 512  # photos are kept at most this short side: crops for 224-260 px inputs
# Grey 32x32 thumbnails correlated above this are one photo. Rescaled or re-encoded copies
# correlate above 0.99; distinct photos here at most 0.72 (orange.jpg vs flower). A shifted
# stereo twin (motorcycle_right vs _left: 0.75) is not caught, so twins are curated out by hand.
NEAR_DUPLICATE_CORRELATION = 0.95
THUMB_SIDE = 32
MIN_TRAINING_PHOTOS = 8  # fewer and the "attack" would only show that there was no data

# Random resized crop: fraction of the photo's area and aspect-ratio range (the usual
# ImageNet training augmentation, with a larger minimum area so that a crop still shows a
# scene rather than a texture patch).
CROP_AREA = (0.25, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
JITTER = 0.3  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]


def _skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _matplotlib_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data"


# (source, path relative to the source's directory). The built-in evaluation photos are
# absent by construction *and* excluded by content at run time; sklearn's two photos (china,
# flower) are both evaluation photos, so sklearn contributes none.
_SKIMAGE = (
    "brick.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "page.png",
    "text.png",
    "cell.png",
    # not motorcycle_right.png: the stereo twin of the evaluation photo motorcycle_left;
    # not retina.jpg: a built-in evaluation photo (the run-time check would drop it anyway)
)
_MATPLOTLIB = ("grace_hopper.jpg",)
_OPENCV = (
    "data/aero1.jpg",
    "data/aero3.jpg",
    "data/aloeL.jpg",
    "data/apple.jpg",
    "data/baboon.jpg",
    "data/basketball1.png",
    "data/board.jpg",
    "data/box.png",
    "data/box_in_scene.png",
    "data/building.jpg",
    "data/butterfly.jpg",
    "data/chicky_512.png",
    "data/fruits.jpg",
    "data/graf1.png",
    "data/home.jpg",
    "data/leuvenA.jpg",
    "data/licenseplate_motion.jpg",
    "data/messi5.jpg",
    "data/orange.jpg",
    "data/pca_test1.jpg",
    "data/squirrel_cls.jpg",
    "data/starry_night.jpg",
    "data/stuff.jpg",
    "data/rubberwhale1.png",
    "data/ela_original.jpg",
    "data/left01.jpg",
    "alphamat/input_images/plant.jpg",
    "dnn_superres/butterfly.png",
    "hfs/data/000.jpg",
    "hfs/data/001.jpg",
    "hfs/data/002.jpg",
    "reg/home.png",
    "text/scenetext01.jpg",
    "text/scenetext02.jpg",
    "text/scenetext03.jpg",
    "text/scenetext04.jpg",
    "text/scenetext05.jpg",
    "text/scenetext06.jpg",
    "data/smarties.png",
)
IMAGEMAGICK_DOC_IMAGES = Path("/usr/share/doc/imagemagick-6-common/html/images")
# only the unprocessed bluebells photo (its _darker/_lin/_log siblings are the same photo)
_IMAGEMAGICK = ("bluebells_clipped.jpg",)


@dataclass(frozen=True)
class TrainingPhoto:
    """One distinct photo the attacker owns."""

    name: str  # "source:relative/path"
    sha256: str  # of the decoded pixels (see `pixel_sha256`)
    pixels: np.ndarray  # (H, W, 3) uint8, short side at most MAX_STORED_SIDE


@dataclass(frozen=True)
class TrainingSet:
    """The attacker's photos and a record of what was left out and why."""

    photos: tuple[TrainingPhoto, ...]
    excluded: tuple[tuple[str, str], ...] = field(default=())  # (name, reason)
    missing_sources: tuple[str, ...] = field(default=())

    def summary(self) -> dict[str, object]:
        """JSON-ready description for the plan: how many distinct photos, from where, which."""
        by_source: dict[str, int] = {}
        for p in self.photos:
            src = p.name.split(":", 1)[0]
            by_source[src] = by_source.get(src, 0) + 1
        return {
            "distinct_photos": len(self.photos),
            "by_source": by_source,
            "photos": [{"name": p.name, "sha256": p.sha256} for p in self.photos],
            "excluded": [{"name": n, "reason": r} for n, r in self.excluded],
            "missing_sources": list(self.missing_sources),
            "augmentation": {
                "crop_area": list(CROP_AREA),
                "crop_aspect": list(CROP_ASPECT),
                "hflip": 0.5,
                "jitter": JITTER,
            },
        }


def pixel_sha256(rgb: np.ndarray) -> str:
    """Content hash of an image: SHA-256 of its shape and decoded uint8 RGB pixels."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h = hashlib.sha256(repr(rgb.shape).encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def builtin_photo_hashes() -> set[str]:
    """Pixel hashes of the built-in evaluation photos: never training data."""
    from infenclave.sample_images import builtin_images

    return {pixel_sha256(decode_image(p.read_bytes())) for p in builtin_images().values()}


def _thumb(rgb: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm grey THUMB_SIDE^2 vector: equal for rescaled or re-encoded copies."""
    grey = Image.fromarray(rgb).convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    v = np.asarray(grey, dtype=np.float64).ravel()
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return np.asarray(v / n if n > 0 else v)


def _candidates() -> tuple[list[tuple[str, Path]], list[str]]:
    found: list[tuple[str, Path]] = []
    missing: list[str] = []
    roots = [
        ("skimage", _skimage_dir(), _SKIMAGE),
        ("matplotlib", _matplotlib_dir(), _MATPLOTLIB),
        ("opencv-doc", OPENCV_DOC_EXAMPLES, _OPENCV),
        ("imagemagick-6-doc", IMAGEMAGICK_DOC_IMAGES, _IMAGEMAGICK),
    ]
    for source, root, names in roots:
        if not root.is_dir():
            missing.append(source)
            continue
        found.extend((f"{source}:{n}", root / n) for n in names if (root / n).is_file())
    return found, missing


def _shrink(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = MAX_STORED_SIDE / min(h, w)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def training_photos(exclude: Mapping[str, np.ndarray] | Iterable[np.ndarray] = ()) -> TrainingSet:
    """Load the attacker's photos, minus the built-in evaluation photos and `exclude`.

    `exclude` holds the caller's evaluation images ((H, W, 3) uint8, any size, as decoded or as
    preprocessed): each is excluded by pixel hash and by near-duplicate thumbnail, in addition
    to the built-in evaluation photos, which are always excluded.
    """
    from infenclave.sample_images import builtin_images

    held_out = [decode_image(p.read_bytes()) for p in builtin_images().values()]
    extra = exclude.values() if isinstance(exclude, Mapping) else exclude
    held_out.extend(np.asarray(x, dtype=np.uint8) for x in extra)
    held_hashes = {pixel_sha256(x) for x in held_out}
    held_thumbs = np.stack([_thumb(x) for x in held_out])  # (E, THUMB_SIDE^2)

    candidates, missing = _candidates()
    photos: list[TrainingPhoto] = []
    excluded: list[tuple[str, str]] = []
    kept_thumbs: list[np.ndarray] = []
    for name, path in candidates:
        try:
            rgb = decode_image(path.read_bytes())
        except (OSError, ImageError) as exc:
            excluded.append((name, f"unreadable: {exc}"))
            continue
        digest = pixel_sha256(rgb)
        thumb = _thumb(rgb)
        if digest in held_hashes:
            excluded.append((name, "identical pixels to an evaluation photo"))
            continue
        corr = float(np.max(held_thumbs @ thumb))
        if corr > NEAR_DUPLICATE_CORRELATION:
            excluded.append((name, f"near-duplicate of an evaluation photo (thumbnail r={corr:.2f})"))
            continue
        if kept_thumbs and float(np.max(np.stack(kept_thumbs) @ thumb)) > NEAR_DUPLICATE_CORRELATION:
            excluded.append((name, "near-duplicate of another training photo"))
            continue
        kept_thumbs.append(thumb)
        photos.append(TrainingPhoto(name=name, sha256=digest, pixels=_shrink(rgb)))
    if len(photos) < MIN_TRAINING_PHOTOS:
        raise AssessmentError(
            f"only {len(photos)} training photos found for the chosen-inputs attack (need "
            f"{MIN_TRAINING_PHOTOS}); install the Debian package opencv-doc (scripts/system-deps.sh)"
        )
    # A second, independent line of defence: no kept photo may hash like a held-out one.
    if {p.sha256 for p in photos} & held_hashes:  # pragma: no cover - guarded above
        raise AssessmentError("an evaluation photo leaked into the training photos")
    return TrainingSet(photos=tuple(photos), excluded=tuple(excluded), missing_sources=tuple(missing))


def augment(photos: Sequence[TrainingPhoto], n: int, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """n random training views at (H, W): resized crop, flip, colour jitter -> (n, H, W, 3) uint8."""
    out = np.empty((n, hw[0], hw[1], 3), dtype=np.uint8)
    for i in range(n):
        rgb = photos[int(rng.integers(len(photos)))].pixels
        out[i] = _jitter(_random_crop(rgb, hw, rng), rng)
    return out


def _random_crop(rgb: np.ndarray, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    target_aspect = hw[1] / hw[0]
    for _ in range(10):  # rejection-sample a crop that fits, as torchvision does
        area = h * w * rng.uniform(*CROP_AREA)
        aspect = target_aspect * np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        side = min(h, w)
        cw, ch = min(w, int(side * target_aspect)), side
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    crop = Image.fromarray(rgb[top : top + ch, left : left + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def _jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = rgb.astype(np.float32)
    b, c, s = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
    x = x * b  # brightness
    x = (x - x.mean()) * c + x.mean()  # contrast about the mean grey level
    grey = x @ np.asarray([0.299, 0.587, 0.114], np.float32)  # (H, W)
    x = (x - grey[..., None]) * s + grey[..., None]  # saturation
    return np.asarray(np.clip(x + 0.5, 0, 255), dtype=np.uint8)
