"""The assessment under a stated adversary: KL method and inversion attacks combined."""

from __future__ import annotations

import json

import pytest

from infenclave.assess.command import AssessOptions, run_assess
from infenclave.assess.plan import validate_plan
from infenclave.errors import AssessmentError


@pytest.fixture(scope="module")
def two_runs(photos, tmp_path_factory):
    """The same photos assessed as passive and as knows-weights (a small white-box budget)."""
    base = tmp_path_factory.mktemp("adv")
    runs = {}
    for adversary in ("passive", "knows-weights"):
        out = base / adversary
        run_assess(AssessOptions(model="efficientnet-lite0", images=[photos["coffee"]],
                                 out=out, adversary=adversary, whitebox_steps=10))
        runs[adversary] = (json.loads((out / "plan.json").read_text()), (out / "report.html").read_text())
    return runs


def _index(plan, name):
    return None if name is None else next(c["index"] for c in plan["cuts"] if c["name"] == name)


def test_knows_weights_never_recommends_an_earlier_cut_than_passive(two_runs) -> None:
    passive, _ = two_runs["passive"]
    strong, _ = two_runs["knows-weights"]
    p, k = passive["recommendation"]["front_end"], strong["recommendation"]["front_end"]
    assert p is not None  # coffee has a KL-safe cut
    assert k is None or _index(strong, k) >= _index(passive, p)
    assert passive["adversary"]["name"] == "passive" and passive["adversary"]["attacks"] == []
    assert strong["adversary"]["name"] == "knows-weights" and strong["adversary"]["attacks"] == ["whitebox"]


def test_attack_figures_are_recorded_per_cut_and_photo(two_runs) -> None:
    plan, html = two_runs["knows-weights"]
    validate_plan(plan)
    attacked = plan["adversary"]["attacked_cuts"]
    assert attacked[0] == "_conv_stem"  # the input-side reference cut is always attacked
    stem = next(c for c in plan["cuts"] if c["name"] == "_conv_stem")
    figures = stem["metrics"]["whitebox"]
    assert {im["image"] for im in figures["images"]} == {"coffee"}
    assert all(0 <= im["ssim"] <= 1 and im["psnr"] > 0 for im in figures["images"])
    assert stem["verdicts"]["whitebox"]["safe"] is False  # the stem IR gives the photo away
    assert plan["adversary"]["results"]["judge"]["name"] != "efficientnet-lite0"
    assert 'id="inversion-whitebox"' in html and 'id="attack-metrics"' in html


def test_unknown_adversary_is_refused_before_any_work(photos, tmp_path) -> None:
    with pytest.raises(AssessmentError, match="unknown adversary"):
        run_assess(AssessOptions(model="efficientnet-lite0", images=[photos["coffee"]],
                                 out=tmp_path / "o", adversary="omniscient"))
    assert not (tmp_path / "o").exists()
