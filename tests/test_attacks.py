"""Inversion attacks on real Lite0 and real photos: white-box inversion, metrics, verdict, API."""

from __future__ import annotations

import numpy as np
import pytest

from infenclave.errors import AssessmentError

PHOTOS = ("chelsea", "coffee")
EARLY, DEEP = "_conv_stem", "_conv_head"
STEPS = 100  # = whitebox.MIN_STEPS: no plateau stop before, so the step count is exact


@pytest.fixture(scope="module")
def eval_images():
    from infenclave.assess.attacks import load_eval_images

    return {k: v for k, v in load_eval_images().items() if k in PHOTOS}


@pytest.fixture(scope="module")
def judge(lite0):
    from infenclave.assess.attacks import Judge

    return Judge.for_model(lite0)


@pytest.fixture(scope="module")
def whitebox_run(lite0, lite0_net, eval_images, judge):
    """One white-box assessment, both formulations at 100 steps each: the first cut and a deep one."""
    from infenclave.assess.attacks import Budgets, run_attacks

    events = []
    results = run_attacks(
        lite0,
        lite0_net,
        [EARLY, DEEP],
        eval_images,
        "knows-weights",
        budgets=Budgets(whitebox_steps=STEPS, whitebox_restarts=2),
        judge=judge,
        seed=0,
        progress=events.append,
        threads=1,
    )
    return results, events


def test_whitebox_first_cut_is_near_exact(whitebox_run) -> None:
    results, _ = whitebox_run
    cut = results.result("whitebox", EARLY)
    assert cut is not None and cut.budget == results.budgets.whitebox_steps
    for img in cut.images:
        assert img.ssim > 0.8, (img.image, img.ssim)
        assert img.recognised and img.unsafe
        assert img.ir_error is not None and img.ir_error < 0.05
        assert img.reconstruction.shape == (224, 224, 3) and img.reconstruction.dtype == np.uint8
    assert cut.unsafe


def test_whitebox_recovers_less_with_depth(whitebox_run) -> None:
    results, _ = whitebox_run
    early, deep = results.result("whitebox", EARLY), results.result("whitebox", DEEP)
    assert early is not None and deep is not None
    assert deep.recognised_count < early.recognised_count
    for e, d in zip(early.images, deep.images):
        assert d.ssim < e.ssim - 0.4
        assert d.judge_kl > e.judge_kl
        assert d.judge_rank >= e.judge_rank


def test_results_record_and_progress(whitebox_run) -> None:
    import json

    results, events = whitebox_run
    total = results.budgets.whitebox_steps * results.budgets.whitebox_restarts
    assert len(events) == 2 * (total + 1)  # every step of both restarts, then "done"
    assert events[-1].cut == DEEP and events[-1].done == events[-1].total == total
    kept = results.result("whitebox", EARLY).extra
    assert [r["formulation"] for r in kept["restarts"]] == ["relative-mse", "channel-normalised"]
    assert len(kept["kept"]) == len(PHOTOS)
    assert events[0].cuts_total == 2 and events[0].cut_number == 1
    doc = json.loads(json.dumps(results.to_dict()))  # JSON-ready, no pixels
    assert doc["adversary"] == "knows-weights" and doc["attacks"] == ["whitebox"]
    assert doc["judge"]["name"] == "efficientnet-lite2"
    assert [c["cut"] for c in doc["cuts"]] == [EARLY, DEEP]
    rec = doc["cuts"][0]["images"][0]
    assert set(rec) >= {
        "image",
        "ssim",
        "psnr",
        "ssim_reference",
        "recognised",
        "judge_rank",
        "judge_kl",
        "judge_original_label",
        "judge_reconstruction_top5",
        "unsafe",
    }
    assert doc["cuts"][0]["seconds_per_reconstruction"] > 0
    assert results.cut_unsafe(EARLY) is True and results.cut_unsafe("_blocks.5") is None
    assert set(results.originals) == set(PHOTOS)


def test_inversion_figure(whitebox_run) -> None:
    from infenclave.assess.attacks import inversion_grid

    results, _ = whitebox_run
    grid = inversion_grid(results, "whitebox")
    assert grid.dtype == np.uint8 and grid.shape[1] == 3 * 224 and grid.shape[0] >= 2 * 224


def test_same_seed_same_reconstruction(lite0, lite0_net, eval_images) -> None:
    from infenclave.assess.attacks import whitebox
    from infenclave.assess.attacks._front import OnnxFront, torch_front
    from infenclave.enclave.imaging import resize_and_crop

    x = resize_and_crop(eval_images["coffee"], lite0.preprocess)[None]
    target = OnnxFront(lite0_net, EARLY)(x)
    front = torch_front(lite0_net, EARLY)
    a = whitebox.invert(front, target, lite0.preprocess, steps=3, seed=7)
    b = whitebox.invert(front, target, lite0.preprocess, steps=3, seed=7)
    c = whitebox.invert(front, target, lite0.preprocess, steps=3, seed=8)
    assert np.array_equal(a.reconstructions, b.reconstructions)
    assert not np.array_equal(a.reconstructions, c.reconstructions)


def test_metrics_sanity(eval_images, judge, lite0) -> None:
    from infenclave.assess.attacks import kl_of_probabilities, psnr, ssim
    from infenclave.enclave.imaging import resize_and_crop

    crops = np.stack([resize_and_crop(v, lite0.preprocess) for v in eval_images.values()])
    x = crops[0]
    assert ssim(x, x) == pytest.approx(1.0)
    assert psnr(x, x) == float("inf")
    assert ssim(x, 255 - x) < 0.1
    probs = judge.probabilities(crops)
    assert probs.shape == (len(crops), 1000) and np.allclose(probs.sum(axis=1), 1.0)
    for p in probs:  # the judge recognises every original as itself, with no divergence
        verdict = judge.compare(p, p)
        assert verdict.recognised and verdict.rank == 1
        assert verdict.kl == pytest.approx(0.0, abs=1e-9)
    assert kl_of_probabilities(probs[0], probs[1]) > 1.0  # a cat is not an espresso
    labels = [judge.compare(p, p).original_top1_label for p in probs]
    assert "cat" in labels[0] and labels[1] == "espresso"
    with pytest.raises(AssessmentError):
        ssim(x, x[:100])


def test_judge_is_never_the_assessed_model(lite0) -> None:
    from infenclave.assess.attacks import Judge, default_judge_name

    assert default_judge_name("efficientnet-lite0") == "efficientnet-lite2"
    assert default_judge_name("efficientnet-lite2") == "efficientnet-lite1"
    with pytest.raises(AssessmentError, match="assessed model itself"):
        Judge.for_model(lite0, "efficientnet-lite0")


def test_verdict_rule() -> None:
    from infenclave.assess.attacks import attack_verdict
    from infenclave.assess.attacks.metrics import tiny_image
    from infenclave.assess.attacks.runner import ImageResult

    def record(recognised: bool, value: float, reference: float) -> ImageResult:
        return ImageResult(
            image="x",
            reconstruction=np.zeros((2, 2, 3), np.uint8),
            ssim=value,
            psnr=10.0,
            ssim_reference=reference,
            recognised=recognised,
            judge_rank=1 if recognised else 500,
            judge_kl=0.0,
            judge_original_label="",
            judge_original_prob=0.0,
            judge_reconstruction_top5=(),
            ir_error=None,
        )

    assert attack_verdict(record(True, 0.05, 0.6))  # recognised, however low the SSIM
    assert attack_verdict(record(False, 0.7, 0.6))  # as close as the photo's 32 px version
    assert not attack_verdict(record(False, 0.4, 0.6))
    from infenclave.assess.attacks.reident import Reidentification

    found = record(False, 0.1, 0.6)
    found.reid = Reidentification(structural_rank=1, deep_rank=40, gallery=100)
    assert attack_verdict(found)  # the host can tell which photo it was
    found.reid = Reidentification(structural_rank=2, deep_rank=40, gallery=100)
    assert not attack_verdict(found)
    x = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert tiny_image(x, 32).shape == x.shape


def test_adversaries_and_their_attacks() -> None:
    from infenclave.assess.attacks import attacks_for

    assert attacks_for("knows-weights") == ("whitebox",)
    assert attacks_for("chosen-inputs") == ("decoder",)
    assert attacks_for("passive") == ()
    assert attacks_for("knows-weights", ["whitebox", "decoder"]) == ("whitebox", "decoder")
    with pytest.raises(AssessmentError, match="cannot mount"):
        attacks_for("chosen-inputs", ["whitebox"])
    with pytest.raises(AssessmentError, match="unknown adversary"):
        attacks_for("root")


def test_passive_adversary_runs_no_attack(lite0, lite0_net, eval_images) -> None:
    from infenclave.assess.attacks import run_attacks

    results = run_attacks(lite0, lite0_net, [EARLY], eval_images, "passive")
    assert results.cuts == [] and results.attacks == () and results.cut_unsafe(EARLY) is None


def test_public_names() -> None:
    import infenclave.assess.attacks as attacks

    assert set(attacks.__all__) == {
        "ADVERSARIES",
        "ATTACKS",
        "DEFAULT_ADVERSARY",
        "TINY_IMAGE_SIDE",
        "AttackResults",
        "Budgets",
        "CutAttackResult",
        "ImageResult",
        "Judge",
        "ProgressEvent",
        "TrainingSet",
        "attack_verdict",
        "attacks_for",
        "default_judge_name",
        "inversion_grid",
        "kl_of_probabilities",
        "load_eval_images",
        "pixel_sha256",
        "psnr",
        "run_attacks",
        "save_inversion_grid",
        "ssim",
        "training_photos",
    }
    for name in attacks.__all__:
        assert getattr(attacks, name) is not None
