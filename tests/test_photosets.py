"""The three offline photo sets: real photos from installed packages, disjoint, large enough.

A safety claim needs 29 photos none of which is recovered, scored on photos the attack never
learnt from, and confirmed on photos that took no part in choosing the cut. The photos come
only from packages `scripts/system-deps.sh` installs; where it could not (not root), the
test says so instead of failing on a machine that cannot have them.
"""

from __future__ import annotations

import os

import pytest

from infenclave.assess.photosets import (
    BACKGROUND_PHOTOS,
    CONFIRMATION_TARGET,
    EVALUATION_TARGET,
    TRAINING_TARGET,
    check_disjoint,
    offline_sets,
    photo_bytes,
)


@pytest.fixture(scope="module")
def sets():
    missing = sorted({pkg for pkg, path in BACKGROUND_PHOTOS if not path.is_file()})
    if missing and os.geteuid() != 0:
        pytest.skip(f"photo packages not installed and not root to install them: {', '.join(missing)}")
    return offline_sets()


def test_three_disjoint_sets_reach_their_sizes(sets) -> None:
    check_disjoint(sets)
    assert len(sets["training"].photos) >= TRAINING_TARGET
    assert len(sets["evaluation"].photos) >= EVALUATION_TARGET
    assert len(sets["confirmation"].photos) >= CONFIRMATION_TARGET
    for s in sets.values():
        assert not s.missing, (s.role, s.missing)
    hashes = [p.sha256 for s in sets.values() for p in s.photos]
    assert len(hashes) == len(set(hashes))


def test_confirmation_photos_come_from_several_packages_and_are_not_tiny(sets) -> None:
    conf = sets["confirmation"]
    assert len(conf.by_source()) >= 5  # no single package decides the confirmation
    assert sum(conf.by_source().values()) == len(conf.photos)
    for p in conf.photos:
        h, w, c = p.rgb.shape
        assert c == 3 and min(h, w) >= 100, (p.name, p.rgb.shape)  # jigzo castle: 120 x 232
        assert p.rgb.std() > 20, p.name  # a photo, not a flat background
    summary = conf.summary()
    assert summary["photos"] == len(conf.photos) and summary["target"] == CONFIRMATION_TARGET


def test_a_jigsaw_puzzle_file_yields_its_photo_and_a_broken_one_is_refused(tmp_path) -> None:
    from infenclave.enclave.imaging import decode_image
    from infenclave.errors import ImageError

    pzl = next((p for pkg, p in BACKGROUND_PHOTOS if p.suffix == ".pzl" and p.is_file()), None)
    if pzl is None:
        pytest.skip("jigzo-data is not installed")
    rgb = decode_image(photo_bytes(pzl))
    assert rgb.ndim == 3 and min(rgb.shape[:2]) >= 100
    broken = tmp_path / "broken.pzl"
    broken.write_bytes(b"PzlF\n0.1\nno photo here\n")
    with pytest.raises(ImageError):
        photo_bytes(broken)
