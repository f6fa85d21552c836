"""Three disjoint sets of real, offline photos: decoder training, evaluation, confirmation.

A safety claim needs many photos (29, none recovered, for a 10% bound: `attacks.evidence`),
and the photos an attack is scored on must never be photos it learnt from, nor photos that
were used to choose the cut it confirms. Everything here ships in installed packages; nothing
is downloaded. Sources, curated by hand (every file looked at; drawings, renders, abstract
art, logos, screenshots, calibration patterns and near-copies left out):

- the 8 built-in photos (`sample_images`: scikit-image, scikit-learn) - evaluation;
- Debian desktop backgrounds that are photographs: `mate-backgrounds` (12 nature photos),
  `lomiri-wallpapers-16.04` / `-20.04` (14), `plasma-workspace-wallpapers` (11) -
  evaluation, and the last 5 of them confirmation;
- Debian packages that carry photographs for other purposes (confirmation; all installed by
  `scripts/system-deps.sh`, about 26 MB of downloads; licence as each package's copyright
  file states): `jigzo-data` (12, the photo inside each children's jigsaw puzzle file,
  GPL-2+, the penguin CC-BY-NC-SA-1.0), `labelme-examples` (7 annotation examples: 3 PASCAL
  VOC photos, a kitten, a dog, a shelf, a street; GPL-3+), `hugin-data` (6 photos of the
  panorama stitcher's manual: Grand Central, Tuebingen, a forest, a kitchen, a building, a
  bridge; GPL-2+), `palapeli-data` (5 jigsaw photos: castle, bridge, citrus, bee,
  chameleon; GPL-2+), `libvips-doc` (the owl of its manual; LGPL-2.1) and
  `sddm-theme-maldives` (its login background; GPL-2+);
- the decoder's training photos (`attacks.training_data`: scikit-image, matplotlib,
  `opencv-doc`, `imagemagick-6-doc`).

Looked at and not used (every image seen on a contact sheet): `gnome-backgrounds`,
`ukui-wallpapers`, `sway-backgrounds`, `lomiri-wallpapers`, `desktop-base`,
`xfdesktop4-data`, the other `sddm-theme-*` and `slim` themes (abstract art or renders);
`fotoxx-common`, `kphotoalbum`, `digikam-data` (screenshots of the program, edited photos);
`hugin-data`'s fisheye, stereographic, grid-overlaid and aliasing-crop variants (projections
or near-copies of the photos kept); `labelme-examples`' other video frames (near-copies);
`gcompris-qt-data` (photos inside Qt resource bundles); `darktable`, `puzzle-jigsaw` and
`gtkmorph-example` (one or two photos each, behind a whole GUI's dependencies). That gives 37 background photos
plus 32 others: 32 complete the evaluation set to 40 and 37 remain for confirmation, more than
the 29 a confirmation needs, so the cut chosen on the evaluation photos is confirmed on photos
that took no part in choosing it (`adversary`); without these packages the confirmation set is
short and the fixed-sequence test alone decides (`attacks.evidence`), as the plan says.

Disjointness is checked by content, not by name: a photo whose decoded pixels hash like one in
an earlier set (built-in evaluation photos first, then training) is dropped from the later set,
as is a near-copy (grey 32 px thumbnails correlated above 0.95, `training_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infenclave.errors import AssessmentError, ImageError

EVALUATION_TARGET = 40  # the minimum; 29 would be the least for a 10% bound at k = 0
CONFIRMATION_TARGET = 29  # photos_needed(0.10)
TRAINING_TARGET = 50

_MATE = Path("/usr/share/backgrounds/mate/nature")
_BG = Path("/usr/share/backgrounds")
_PLASMA = Path("/usr/share/wallpapers")
_JIGZO = Path("/usr/share/games/jigzo/puzzles/00_default")
_LABELME = Path("/usr/share/doc/labelme-examples/examples")
_HUGIN = Path("/usr/share/hugin/xrc/data/help_en_EN")
_PALAPELI = Path("/usr/share/palapeli/collection")

# (package, path). Order is the assignment order: the first ones complete the evaluation set.
BACKGROUND_PHOTOS: tuple[tuple[str, Path], ...] = (
    *(
        ("mate-backgrounds", _MATE / f)
        for f in (
            "Aqua.jpg",
            "Blinds.jpg",
            "Dune.jpg",
            "FreshFlower.jpg",
            "Garden.jpg",
            "GreenMeadow.jpg",
            "LadyBird.jpg",
            "RainDrops.jpg",
            "Storm.jpg",
            "TwoWings.jpg",
            "Wood.jpg",
            "YellowFlower.jpg",
        )
    ),
    *(
        ("lomiri-wallpapers-16.04", _BG / f)
        for f in (
            "Bridge_by_Sander_Klootwijk.jpg",
            "Dragonfly_by_Bolly.jpg",
            "Picture_0B_by_freespace.jpg",
            "Picture_1A_by_freespace.jpg",
            "Wine_by_Jakkub_Mede.jpg",
            "aitzgorri_by_Aitzol_Berasategi.jpg",
            "free_by_Peter_Nerlich.jpg",
            "friends_by_Aitzol_Berasategi.jpg",
            "greentock_by_Peter_Nerlich.jpg",
            "life_by_Aitzol_Berasategi.jpg",
            "picosdeeuropa_by_Aitzol_Berasategi.jpg",
            "seeding_by_Clements_Engelhardt.jpg",
            "sunset_by_Aitzol_Berasategi.jpg",
        )
    ),
    ("lomiri-wallpapers-20.04", _BG / "Kleiber_by_Lukas_Baubkus.jpg"),
    *(
        ("plasma-workspace-wallpapers", _PLASMA / d / "contents/images/1920x1080.jpg")
        for d in ("BytheWater", "ColdRipple", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey")
    ),
    # the rest: confirmation (after the evaluation set is complete)
    ("plasma-workspace-wallpapers", _PLASMA / "ColorfulCups/contents/images/2560x1600.jpg"),
    *(
        ("plasma-workspace-wallpapers", _PLASMA / d / "contents/images/1920x1080.jpg")
        for d in ("Kite", "OneStandsOut", "Path", "summer_1am")
    ),
    *(
        ("jigzo-data", _JIGZO / f"{f}.pzl")
        for f in (
            "bike-3x4",
            "bird-2x3",
            "blackberry-3x3",
            "castle-6x3",
            "clouds-4x4",
            "gorilla2-3x3",
            "heli-4x3",
            "horse-4x3",
            "penguin-3x2",
            "tobogan-4x3",
            "train-2x2",
            "windmill-4x4",
        )
    ),
    *(
        ("labelme-examples", _LABELME / f)
        for f in (
            "bbox_detection/data_annotated/2011_000003.jpg",
            "bbox_detection/data_annotated/2011_000006.jpg",
            "bbox_detection/data_annotated/2011_000025.jpg",
            "classification/data_annotated/0001.jpg",
            "classification/data_annotated/0002.jpg",
            "tutorial/apc2016_obj3.jpg",
            "video_annotation/data_annotated/00000100.jpg",
        )
    ),
    *(
        ("hugin-data", _HUGIN / f)
        for f in (
            "800px-C_Marchi-GrandCentral-adj.jpg",
            "600px-Tuebingen_Neckarfront_small15_2006-06-11.jpg",
            "CA_fringes00.jpg",
            "AliasingPTpoly3.jpg",
            "CA_tCA00.jpg",
            "250px-LagardePont-defish.jpg",
        )
    ),
    *(
        ("palapeli-data", _PALAPELI / f"{f}.jpg")
        for f in (
            "castle-maintenon",
            "cincinnati-bridge",
            "citrus-fruits",
            "european-honey-bee",
            "panther-chameleon-female",
        )
    ),
    ("libvips-doc", Path("/usr/share/gtk-doc/html/libvips/owl.jpg")),
    ("sddm-theme-maldives", Path("/usr/share/sddm/themes/maldives/background.jpg")),
)


@dataclass(frozen=True)
class Photo:
    """One offline photo, decoded, with the pixel hash that keeps the sets disjoint."""

    name: str  # "source:file"
    source: str  # the package it ships in
    sha256: str  # of the decoded pixels
    rgb: np.ndarray  # (H, W, 3) uint8, short side at most MAX_STORED_SIDE


@dataclass
class PhotoSet:
    """One named set of photos and what was left out of it and why."""

    role: str  # "training" | "evaluation" | "confirmation"
    photos: list[Photo] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # packages not installed
    target: int = 0

    def by_source(self) -> dict[str, int]:
        """Photo count per package it ships in (the report's "sources and counts")."""
        out: dict[str, int] = {}
        for p in self.photos:
            out[p.source] = out.get(p.source, 0) + 1
        return out

    def images(self) -> dict[str, np.ndarray]:
        """Name -> (H, W, 3) uint8, as the attacks take them."""
        return {p.name: p.rgb for p in self.photos}

    def summary(self) -> dict[str, Any]:
        """JSON-ready record for the plan: counts, sources, names, hashes, exclusions."""
        return {
            "role": self.role,
            "photos": len(self.photos),
            "target": self.target,
            "by_source": self.by_source(),
            "names": [p.name for p in self.photos],
            "sha256": [p.sha256 for p in self.photos],
            "excluded": [{"name": n, "reason": r} for n, r in self.excluded],
            "missing_packages": sorted(set(self.missing)),
        }


def _load(path: Path) -> np.ndarray:
    from infenclave.assess.attacks.training_data import _shrink
    from infenclave.enclave.imaging import decode_image

    return _shrink(decode_image(photo_bytes(path)))


def photo_bytes(path: Path) -> bytes:
    """The encoded photo in `path`: the file itself, or for a jigzo puzzle (`.pzl`: a text
    header, the photo as JPEG, then the PNG piece mask) the JPEG between the two."""
    data = path.read_bytes()
    if path.suffix != ".pzl":
        return data
    start = data.find(b"\xff\xd8\xff")
    end = data.find(b"\x89PNG", start)
    if start < 0:
        raise ImageError(f"{path.name} holds no JPEG photo")
    return data[start : end if end > start else len(data)]


def _builtin() -> list[Photo]:
    from infenclave.assess.attacks.training_data import pixel_sha256
    from infenclave.enclave.imaging import decode_image
    from infenclave.sample_images import builtin_images

    out = []
    for name, path in builtin_images().items():
        rgb = decode_image(path.read_bytes())  # hashed at full size: as `training_data` does
        out.append(Photo(f"builtin:{name}", "builtin", pixel_sha256(rgb), rgb))
    return out


def offline_sets() -> dict[str, PhotoSet]:
    """The three disjoint sets (`training`, `evaluation`, `confirmation`) from what is installed.

    Training comes from `training_data` (which already excludes the built-in photos by content);
    the background photos then fill evaluation up to EVALUATION_TARGET and the rest go to
    confirmation, each checked against every earlier photo by pixel hash and thumbnail.
    """
    from infenclave.assess.attacks.training_data import (
        NEAR_DUPLICATE_CORRELATION,
        _thumb,
        pixel_sha256,
        training_photos,
    )

    evaluation = PhotoSet("evaluation", _builtin(), target=EVALUATION_TARGET)
    confirmation = PhotoSet("confirmation", target=CONFIRMATION_TARGET)
    training = PhotoSet("training", target=TRAINING_TARGET)
    ts = training_photos()
    training.photos = [Photo(p.name, p.name.split(":", 1)[0], p.sha256, p.pixels) for p in ts.photos]
    training.excluded = list(ts.excluded)
    training.missing = list(ts.missing_sources)
    seen = {p.sha256 for s in (evaluation, training) for p in s.photos}
    thumbs = [_thumb(p.rgb) for s in (evaluation, training) for p in s.photos]
    for source, path in BACKGROUND_PHOTOS:
        target = evaluation if len(evaluation.photos) < EVALUATION_TARGET else confirmation
        name = f"{source}:{_stem(source, path)}"
        if not path.is_file():
            target.missing.append(source)
            continue
        try:
            rgb = _load(path)
        except (OSError, ImageError) as exc:
            target.excluded.append((name, f"unreadable: {exc}"))
            continue
        digest, thumb = pixel_sha256(rgb), _thumb(rgb)
        if digest in seen:
            target.excluded.append((name, "identical pixels to a photo of another set"))
            continue
        if float(np.max(np.stack(thumbs) @ thumb)) > NEAR_DUPLICATE_CORRELATION:
            target.excluded.append((name, "near-duplicate of a photo of another set"))
            continue
        seen.add(digest)
        thumbs.append(thumb)
        target.photos.append(Photo(name, source, digest, rgb))
    return {"training": training, "evaluation": evaluation, "confirmation": confirmation}


def _stem(source: str, path: Path) -> str:
    """A short, unique photo name within its package (plasma: the wallpaper's folder)."""
    return path.parent.parent.parent.name if source.startswith("plasma") else path.stem


def check_disjoint(sets: dict[str, PhotoSet]) -> None:
    """Raise when any two sets share a photo by pixel hash (a bug or a caller's mistake)."""
    roles = list(sets)
    for i, a in enumerate(roles):
        for b in roles[i + 1 :]:
            shared = {p.sha256 for p in sets[a].photos} & {p.sha256 for p in sets[b].photos}
            if shared:
                raise AssessmentError(f"the {a} and {b} photo sets share {len(shared)} photo(s)")
