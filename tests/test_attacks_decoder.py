"""The chosen-inputs attack: offline training photos kept apart from the evaluation photos,
and an inverse network that beats a trivial baseline at an early cut (real Lite0, real photos)."""

from __future__ import annotations

import numpy as np
import pytest

EARLY = "_conv_stem"
EPOCHS = 6  # enough to beat the mean image by a wide margin (measured: +8 dB after 5 epochs)


@pytest.fixture(scope="module")
def eval_images():
    from infenclave.assess.attacks import load_eval_images

    return load_eval_images()


@pytest.fixture(scope="module")
def training(eval_images):
    from infenclave.assess.attacks import training_photos

    return training_photos(exclude=eval_images)


def test_training_photos_are_disjoint_from_evaluation_photos(training, eval_images) -> None:
    from infenclave.assess.attacks import pixel_sha256
    from infenclave.assess.attacks.training_data import OPENCV_DOC_EXAMPLES

    held_out = {pixel_sha256(v) for v in eval_images.values()}
    kept = {p.sha256 for p in training.photos}
    assert len(held_out) == 8
    assert not kept & held_out
    assert all(pixel_sha256(p.pixels) not in held_out for p in training.photos)
    assert len(kept) == len(training.photos)  # distinct photos, counted once
    summary = training.summary()
    assert summary["distinct_photos"] == len(training.photos)
    if OPENCV_DOC_EXAMPLES.is_dir():
        assert len(training.photos) >= 45 and summary["by_source"]["opencv-doc"] >= 30


def test_exclusion_is_by_content_not_by_name(training) -> None:
    """A training photo passed as an evaluation image under another name, or re-scaled, is
    dropped from training: the check looks at pixels."""
    from PIL import Image

    from infenclave.assess.attacks import training_photos

    victim = training.photos[3]
    renamed = {"holiday.jpg": victim.pixels.copy()}
    again = training_photos(exclude=renamed)
    assert victim.sha256 not in {p.sha256 for p in again.photos}
    assert any("identical pixels" in why for _, why in again.excluded)

    h, w = victim.pixels.shape[:2]
    smaller = np.asarray(Image.fromarray(victim.pixels).resize((w * 2 // 3, h * 2 // 3)))
    again = training_photos(exclude={"thumbnail.png": smaller})
    assert victim.sha256 not in {p.sha256 for p in again.photos}
    assert any("near-duplicate" in why for _, why in again.excluded)


def test_augmentation_gives_distinct_views(training) -> None:
    from infenclave.assess.attacks.training_data import augment

    views = augment(training.photos, 8, (224, 224), np.random.default_rng(0))
    assert views.shape == (8, 224, 224, 3) and views.dtype == np.uint8
    flat = views.reshape(8, -1)
    assert len({v.tobytes() for v in flat}) == 8
    again = augment(training.photos, 8, (224, 224), np.random.default_rng(0))
    assert np.array_equal(views, again)  # seeded


def test_decoder_beats_the_mean_image_at_an_early_cut(lite0, lite0_net, eval_images, training) -> None:
    from infenclave.assess.attacks import Budgets, psnr, run_attacks

    chosen = {k: eval_images[k] for k in ("chelsea", "coffee", "astronaut")}
    results = run_attacks(
        lite0,
        lite0_net,
        [EARLY],
        chosen,
        "chosen-inputs",
        budgets=Budgets(decoder_epochs=EPOCHS),
        seed=0,
        training=training,
    )
    assert results.attacks == ("decoder",)
    assert results.training is not None
    assert results.training["distinct_photos"] == len(training.photos)
    cut = results.result("decoder", EARLY)
    assert cut is not None and cut.extra["training_views"] == EPOCHS * len(training.photos)
    originals = np.stack(list(results.originals.values()))
    mean_image = np.broadcast_to(originals.reshape(-1, 3).mean(axis=0).round().astype(np.uint8), originals.shape[1:])
    for img in cut.images:
        baseline = psnr(results.originals[img.image], np.ascontiguousarray(mean_image))
        assert img.psnr > baseline + 4.0, (img.image, img.psnr, baseline)
        assert img.ir_error is not None and img.ir_error < 1.0  # explains the IR, roughly
    assert np.mean([img.ssim for img in cut.images]) > 0.4


def test_decoder_refuses_training_photos_that_include_an_evaluation_photo(
    lite0, lite0_net, eval_images, training
) -> None:
    from dataclasses import replace

    from infenclave.assess.attacks import pixel_sha256, run_attacks
    from infenclave.assess.attacks.training_data import TrainingPhoto
    from infenclave.errors import AssessmentError

    leak = TrainingPhoto("leak", pixel_sha256(eval_images["coffee"]), eval_images["coffee"])
    tainted = replace(training, photos=(*training.photos, leak))
    with pytest.raises(AssessmentError, match="include an evaluation photo"):
        run_attacks(lite0, lite0_net, [EARLY], {"coffee": eval_images["coffee"]}, "chosen-inputs", training=tainted)
