"""The assessment under a stated adversary: KL method and inversion attacks combined."""

from __future__ import annotations

import json

import pytest

from infenclave.assess.command import AssessOptions, run_assess
from infenclave.assess.plan import Plan, validate_plan
from infenclave.errors import AssessmentError

FIVE = ["coffee", "astronaut", "rocket", "china", "retina"]  # none recovered at the deepest cut at 10 steps


@pytest.fixture(scope="module")
def two_runs(photos, tmp_path_factory):
    """The same photo assessed as passive and as knows-weights; the attacks score 5 photos with a
    small white-box budget (the verdict machinery, not the attack's strength, is under test)."""
    base = tmp_path_factory.mktemp("adv")
    runs = {}
    for adversary in ("passive", "knows-weights"):
        out = base / adversary
        run_assess(
            AssessOptions(
                model="efficientnet-lite0",
                images=[photos["coffee"]],
                out=out,
                adversary=adversary,
                whitebox_steps=10,
                whitebox_restarts=1,
                attack_images=[photos[n] for n in FIVE],
            )
        )
        runs[adversary] = (json.loads((out / "plan.json").read_text()), (out / "report.html").read_text())
    return runs


def _index(plan, name):
    return None if name is None else next(c["index"] for c in plan["cuts"] if c["name"] == name)


def test_five_photos_are_not_enough_evidence(two_runs) -> None:
    plan, html = two_runs["knows-weights"]
    rec = plan["recommendation"]
    assert rec["verdict"] == "not-enough-evidence", rec["reason"]
    assert rec["front_end"] is None and plan["partition"] is None
    assert rec["deployment"] == "whole-model-in-enclave"
    assert plan["enclave"]["flops_share_in_enclave"] == 1.0
    deepest = plan["adversary"]["attacked_cuts"][-1]
    ev = next(c for c in plan["cuts"] if c["name"] == deepest)["verdicts"]["attacks"]
    assert ev["photos"] == 5 and ev["recovered"] == 0 and ev["upper_bound"] == pytest.approx(0.4507, abs=1e-3)
    parsed = Plan.parse(json.dumps(plan))
    assert parsed.verdict == "not-enough-evidence" and parsed.deployment == "whole-model-in-enclave"
    assert 'data-verdict="not-enough-evidence"' in html and "Not enough evidence" in html


def test_passive_recommends_and_knows_weights_never_earlier(two_runs) -> None:
    passive, _ = two_runs["passive"]
    strong, _ = two_runs["knows-weights"]
    p, k = passive["recommendation"]["front_end"], strong["recommendation"]["front_end"]
    assert p is not None and passive["recommendation"]["verdict"] == "safe"  # coffee has a KL-safe cut
    assert k is None or _index(strong, k) >= _index(passive, p)
    assert passive["adversary"]["name"] == "passive" and passive["adversary"]["attacks"] == []
    assert strong["adversary"]["name"] == "knows-weights" and strong["adversary"]["attacks"] == ["whitebox"]


def test_banner_states_adversary_budget_photos_bound_and_enclave_share(two_runs) -> None:
    plan, html = two_runs["knows-weights"]
    facts = html[html.index('id="assessment-facts"') : html.index("</table>", html.index('id="assessment-facts"'))]
    for needle in (
        "knows-weights",
        "whitebox",
        "up to 10 Adam steps",
        "1 restart",
        "Clopper-Pearson",
        "10%",
        "evaluation: 5",
        "training: ",
        "100.0% of the model",
    ):
        assert needle in facts, needle
    assert "{'" not in html  # attack tables are rendered, not dumped as Python dicts
    assert 'id="attack-evidence"' in html
    passive_plan, passive_html = two_runs["passive"]
    share = passive_plan["enclave"]["flops_share_in_enclave"]
    part = passive_plan["partition"]
    total = sum(part[k]["cost"]["flops"] for k in ("frontnet", "backnet", "tail"))
    assert 0.0 < share < 1.0  # FrontNet + Tail of Lite0 at the KL cut, BackNet on the host
    assert share == pytest.approx((part["frontnet"]["cost"]["flops"] + part["tail"]["cost"]["flops"]) / total, abs=0.01)
    assert f"{share * 100:.1f}% of the model" in passive_html


def test_attack_figures_are_recorded_per_cut_and_photo(two_runs) -> None:
    plan, html = two_runs["knows-weights"]
    validate_plan(plan)
    attacked = plan["adversary"]["attacked_cuts"]
    assert attacked[0] == "_conv_stem"  # the input-side reference cut is always attacked
    stem = next(c for c in plan["cuts"] if c["name"] == "_conv_stem")
    figures = stem["metrics"]["whitebox"]
    assert {im["image"] for im in figures["images"]} <= set(FIVE)
    assert all(0 <= im["ssim"] <= 1 and im["psnr"] > 0 for im in figures["images"])
    assert stem["verdicts"]["attacks"]["verdict"] == "unsafe"  # the stem IR gives the photo away
    assert all(im["reidentification"]["gallery"] > 50 for im in figures["images"])
    judges = plan["adversary"]["results"]["judge"]["panel"]
    assert len(judges) >= 2 and "efficientnet-lite0" not in {j["name"] for j in judges}
    assert 'id="inversion-whitebox"' in html and 'id="attack-metrics"' in html


def test_unknown_adversary_is_refused_before_any_work(photos, tmp_path) -> None:
    with pytest.raises(AssessmentError, match="unknown adversary"):
        run_assess(
            AssessOptions(
                model="efficientnet-lite0", images=[photos["coffee"]], out=tmp_path / "o", adversary="omniscient"
            )
        )
    assert not (tmp_path / "o").exists()
