"""The KL-oracle assessment on real Lite0 weights and real photos (no mocks).

Kept cheap: two or three photos whose safe cut comes early (coffee, flower), early-stop mode,
and the analysed network shared by the whole session (conftest's `lite0_net`).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infenclave.assess import PLAN_VERSION, Plan, build_plan, make_oracle, render_report, scan, schema, validate_plan
from infenclave.assess.images import load_images
from infenclave.assess.kl import bilinear_matrix, minmax_normalise, normalise_grey, project, resize_bilinear
from infenclave.assess.plan import default_tail_start, exposure_csv
from infenclave.assess.report import ReportInputs
from infenclave.assess.runtime import RuntimeConfig, cpu_count
from infenclave.enclave.imaging import normalise
from infenclave.errors import AssessmentError

CHECK_CUT = "_blocks.3"  # 40x28x28: small enough to recompute every channel in eager torch
RUNTIME = RuntimeConfig(workers=cpu_count(), threads=1, batch=16)  # pinned: no tuning in tests


def fitted(lite0, photos, *names: str):
    decoded = {d.name: d for d in load_images([photos[n] for n in names])}
    return [decoded[n].fitted(lite0.preprocess) for n in names]


@pytest.fixture(scope="module")
def oracle(lite0, lite0_net):
    return make_oracle(lite0, None)


@pytest.fixture(scope="module")
def early(lite0, lite0_net, oracle, photos):
    """Default mode on coffee (first safe at _blocks.3) and flower (safe from _blocks.1)."""
    return scan(lite0_net, oracle, fitted(lite0, photos, "coffee", "flower"), runtime=RUNTIME)


@pytest.fixture(scope="module")
def plan(early, lite0_net, oracle) -> dict[str, Any]:
    return build_plan(early, lite0_net, oracle, tail_start=default_tail_start(lite0_net), tail_start_source="default")


# --- the numerics against an independent torch computation ------------------------------------


def torch_reference(lite0, pixels: np.ndarray, block: int) -> tuple[np.ndarray, float]:
    """KL(p || q_c) for every channel after MBConv block `block`, and delta, in plain torch."""
    import torch
    import torch.nn.functional as F

    net = lite0.torch_module
    pre = lite0.preprocess
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    captured: list[torch.Tensor] = []
    hook = net._blocks[block].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        x = (torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() - mean) / std  # (1, 3, H, W)
        log_p = torch.log_softmax(net(x).double(), dim=1)[0]  # (K,)
        hook.remove()
        ir = captured[0][0]  # (C, h, w)
        lo = ir.amin(dim=(1, 2), keepdim=True)
        span = ir.amax(dim=(1, 2), keepdim=True) - lo
        unit = torch.where(span > 0, (ir - lo) / torch.where(span > 0, span, 1), torch.zeros_like(ir))
        up = F.interpolate(unit[:, None], size=pre.input_hw, mode="bilinear", align_corners=False)
        imgs = (up * 255.0).repeat(1, 3, 1, 1)  # (C, 3, H, W) grey, pixel units
        log_q = torch.cat([torch.log_softmax(net((b - mean) / std).double(), dim=1) for b in imgs.split(20)])  # (C, K)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(dim=1).numpy()
    delta = float((p * (log_p + np.log(log_p.numel()))).sum())
    return kl, delta


def test_kl_figures_match_an_independent_torch_computation(lite0, lite0_net, oracle, photos) -> None:
    images = fitted(lite0, photos, "coffee")
    res = scan(lite0_net, oracle, images, mode="full", only=[CHECK_CUT], runtime=RUNTIME)
    got = next(c for c in res.cuts if c.cut.name == CHECK_CUT).images[0]
    assert got.complete
    kl_ref, delta_ref = torch_reference(lite0, images[0].pixels, block=int(CHECK_CUT.split(".")[1]))
    assert got.delta == pytest.approx(delta_ref, rel=1e-4)
    np.testing.assert_allclose(got.kl, kl_ref, rtol=2e-3, atol=2e-3)
    assert got.min_kl == pytest.approx(kl_ref.min(), rel=2e-3)
    assert got.median_kl == pytest.approx(float(np.median(kl_ref)), rel=2e-3)
    assert int(np.argmin(kl_ref)) == got.min_channel
    others = [c for c in res.cuts if c.cut.name != CHECK_CUT and c.images is not None]
    assert all(c.status == "not-scanned" for c in others)


def test_projection_pieces_match_torch_and_imaging() -> None:
    import torch
    import torch.nn.functional as F

    from infenclave.models.zoo import ZOO, preprocess

    rng = np.random.default_rng(1)
    maps = rng.standard_normal((5, 13, 9)).astype(np.float32)
    maps[2] = 3.0  # a constant map becomes zeros
    unit = minmax_normalise(maps)
    assert unit.min() == 0.0 and unit.max() == 1.0 and not unit[2].any()
    for out_hw in [(224, 224), (8, 5)]:  # up and down
        ref = F.interpolate(torch.from_numpy(unit)[:, None], size=out_hw, mode="bilinear", align_corners=False)[
            :, 0
        ].numpy()
        np.testing.assert_allclose(resize_bilinear(unit, out_hw), ref, atol=1e-5)
    assert not bilinear_matrix(224, 13).flags.writeable
    pre = preprocess(ZOO["efficientnet-lite0"])
    pixels = rng.uniform(0, 255, (3, 224, 224)).astype(np.float32)
    assert np.array_equal(normalise_grey(pixels, pre), normalise(np.repeat(pixels[..., None], 3, -1), pre))
    x = project(unit, pre)  # (N, 3, H, W)
    assert x.shape == (5, 3, 224, 224) and x.dtype == np.float32
    assert np.all(x[2] == (0.0 - 127.0) / 128.0)


# --- the method's verdicts on real photos ----------------------------------------------------------


def test_stem_is_unsafe_a_later_cut_is_safe_and_the_first_safe_for_all_is_recommended(early) -> None:
    status = {c.cut.name: c.status for c in early.cuts}
    assert status["_conv_stem"] == "unsafe"  # the stem IR is the photo, filtered
    rec = early.recommended
    assert rec is not None and rec.status == "safe"
    assert all(c.status == "safe" for c in early.cuts if c.cut.name == rec.cut.name)
    before = [c for c in early.cuts if c.cut.index < rec.cut.index]
    assert before and all(c.status == "unsafe" for c in before)
    for c in before:  # unsafe for at least one image: a channel at or below its delta
        assert any(r.min_kl is not None and r.min_kl <= r.delta for r in c.images)
    for r in rec.images:  # safe for every image: every channel computed, all above delta
        assert r.complete and r.min_kl > r.delta
    assert rec.cut.name == "_blocks.3"  # coffee's first safe cut (flower's is earlier)
    # early stop: the scan ends two cut points after the recommended one
    assert all(
        c.status == "not-scanned" for c in early.cuts if c.images is not None and c.cut.index > rec.cut.index + 2
    )
    assert early.cuts[rec.cut.index + 1].status in ("safe", "unsafe")
    assert status["_avg_pooling"] == "not-assessable"
    assert early.stats.skipped > 0 and not early.partial


def test_an_image_that_no_cut_protects_gives_no_recommendation(lite0, lite0_net, oracle, photos, tmp_path) -> None:
    # The grey cameraman (p: tripod 94%): many projected maps move the oracle towards tripod
    # more than a uniform guess does, at every cut point. The plan says so; no partition.
    from infenclave.assess.command import AssessOptions, outcome_error, run_assess

    out = tmp_path / "cam"
    import skimage

    camera = Path(skimage.__file__).parent / "data" / "camera.png"
    outcome = run_assess(
        AssessOptions(model="efficientnet-lite0", images=[camera], adversary="passive", out=out, runtime=RUNTIME)
    )
    doc = json.loads((out / "plan.json").read_text())
    assert doc["recommendation"]["front_end"] is None and doc["partition"] is None
    assert all(c["status"] in ("unsafe", "not-assessable") for c in doc["cuts"])
    err = outcome_error(outcome)
    assert isinstance(err, AssessmentError) and "camera" in str(err)


# --- the plan ----------------------------------------------------------------------------------------


def test_plan_validates_and_records_what_a_partition_needs(plan, early, lite0_net) -> None:
    validate_plan(plan)
    parsed = Plan.parse(json.dumps(plan))
    assert parsed.front_end == "_blocks.3" and parsed.tail_start == "_conv_head"
    assert parsed.weights_sha256 == plan["model"]["weights_sha256"] and len(parsed.weights_sha256) == 64
    assert plan["version"] == PLAN_VERSION and plan["scan"]["partial"] is False
    assert [i["name"] for i in plan["images"]] == ["coffee", "flower"]
    assert plan["images"][0]["top1"]["label"] == "espresso"
    cuts = {c["name"]: c for c in plan["cuts"]}
    assert len(cuts) == 19
    chosen = cuts["_blocks.3"]
    assert chosen["safe_for_all"] is True and chosen["verdicts"]["kl_oracle"]["safe"] is True
    assert [r["safe"] for r in chosen["images"]] == [True, True]
    assert chosen["min_kl"] == pytest.approx(min(r.min_kl for r in early.cuts[4].images), abs=1e-5)
    assert cuts["_conv_stem"]["status"] == "unsafe" and cuts["_conv_stem"]["stopped_early"]
    part = plan["partition"]
    for key, runs_in in [("frontnet", "enclave"), ("backnet", "host"), ("tail", "enclave")]:
        cost = part[key]["cost"]
        assert part[key]["runs_in"] == runs_in and cost["param_bytes"] > 0 and cost["flops"] > 0
        assert cost["memory_bytes"] == cost["param_bytes"] + cost["peak_activation_bytes"]
    total = sum(part[k]["cost"]["param_bytes"] for k in ("frontnet", "backnet", "tail"))
    first = lite0_net.cuts[0]
    assert total == first.front_param_bytes + first.back_param_bytes  # every weight, once
    assert part["ir1"] == {"cut": "_blocks.3", "shape": [40, 28, 28], "bytes": 40 * 28 * 28 * 4}


def test_plan_schema_refuses_broken_plans_and_documents_every_field(plan) -> None:
    broken = json.loads(json.dumps(plan))
    broken["cuts"][0]["status"] = "maybe"
    with pytest.raises(AssessmentError, match="cuts/0/status"):
        validate_plan(broken)
    del broken["cuts"][0]["status"]
    with pytest.raises(AssessmentError):
        Plan.parse(json.dumps(broken))
    with pytest.raises(AssessmentError, match="version"):
        Plan.parse(json.dumps({**plan, "version": 99}))

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{path}/{name} has no description"
                walk(sub, f"{path}/{name}")
            for key in ("items", "additionalProperties"):
                if isinstance(node.get(key), dict):
                    walk(node[key], f"{path}/{key}")
            for key in ("$defs", "oneOf"):
                subs = node.get(key, {})
                for name, sub in subs.items() if isinstance(subs, dict) else enumerate(subs):
                    walk(sub, f"{path}/{key}/{name}")

    walk(schema(), "")


def test_exposure_csv_has_one_row_per_cut_and_image(plan) -> None:
    import csv

    rows = list(csv.DictReader(io.StringIO(exposure_csv(plan))))
    assert len(rows) == 19 * 2
    row = next(r for r in rows if r["cut"] == "_blocks.3" and r["image"] == "coffee")
    assert row["safe"] == "true" and row["complete"] == "true" and float(row["min_kl"]) > float(row["delta"])


# --- the report (rendered in a browser by tests/test_assess_cli.py) ---------------------------------


def test_report_embeds_every_figure_as_a_decodable_png(plan, early) -> None:
    from PIL import Image

    html = render_report(ReportInputs(plan=plan, result=early))
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # KL profile, cost, and mosaics: 2 input-side cuts + chosen + next, for 2 photos
    assert len(uris) == 2 + 4 * 2
    import base64

    for u in uris:
        img = Image.open(io.BytesIO(base64.b64decode(u)))
        img.load()
        assert img.width > 300 and img.height > 200
    assert "http://" not in html and "https://" not in html.replace("https://json-schema", "")
    for text in (
        "KL(p || uniform)",
        "min-max normalised",
        "_blocks.3",
        "Partial" if plan["scan"]["partial"] else "FrontNet ends at",
    ):
        assert text in html


def test_bad_requests_are_refused_clearly(lite0, lite0_net, oracle, photos, tmp_path) -> None:
    from infenclave.errors import GraphError, ImageError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="bad.png"):
        load_images([bad])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="no image files"):
        load_images([empty])
    with pytest.raises(ImageError, match="no such file"):
        load_images([tmp_path / "missing.jpg"])
    with pytest.raises(GraphError, match="unknown cut point"):
        scan(lite0_net, oracle, fitted(lite0, photos, "coffee"), only=["_blocks.99"])
    with pytest.raises(AssessmentError, match="not a feature map"):
        scan(lite0_net, oracle, fitted(lite0, photos, "coffee"), only=["_avg_pooling"])
    with pytest.raises(AssessmentError, match="no images"):
        scan(lite0_net, oracle, [])


def test_a_model_without_feature_maps_is_not_assessable(tmp_path, photos) -> None:
    from infenclave.assess.command import AssessOptions, run_assess

    (tmp_path / "mlp.py").write_text(
        "import torch, torch.nn as nn\n"
        "class MLP(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc1, self.fc2, self.head = nn.Linear(768, 32), nn.Linear(32, 16), nn.Linear(16, 4)\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))\n"
        "def build():\n"
        "    return MLP()\n"
    )
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "mlp.yaml").write_text(
        "name: mlp\ntorch: mlp:build\nlabels: labels.txt\n"
        "preprocess: {resize: [16, 16], mean: [0, 0, 0], std: [255, 255, 255]}\n"
    )
    out = tmp_path / "out"
    with pytest.raises(AssessmentError, match="no cut point has a \\(C, H, W\\) feature map"):
        run_assess(
            AssessOptions(model=str(tmp_path / "mlp.yaml"), images=[photos["flower"]], out=out, adversary="passive")
        )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_oracle_with_other_input_size_is_refused(lite0) -> None:
    from infenclave.models import load_model

    with pytest.raises(AssessmentError, match="same input size"):
        make_oracle(lite0, load_model("efficientnet-lite1"))  # 240 px against 224 px


def test_public_surface() -> None:
    import infenclave.assess as assess

    assert set(assess.__all__) == {
        "PLAN_VERSION",
        "AssessImage",
        "AssessOptions",
        "AssessOutcome",
        "Figure",
        "Oracle",
        "Plan",
        "ReportInputs",
        "RuntimeConfig",
        "ScanResult",
        "build_plan",
        "kl_divergence",
        "kl_to_uniform",
        "make_oracle",
        "minmax_normalise",
        "project",
        "render_report",
        "run_assess",
        "scan",
        "schema",
        "validate_plan",
    }


def test_tuner_times_each_setting_alone_and_keeps_the_fastest() -> None:
    from infenclave.assess.runtime import TRIAL_BATCHES, Tuner

    now = [0.0]
    slow, fast = RuntimeConfig(1, 2, 16), RuntimeConfig(2, 1, 8)
    tuner = Tuner([slow, fast], clock=lambda: now[0])
    for cfg, seconds_per_batch in [(slow, 1.0), (fast, 0.1)]:
        assert tuner.config == cfg and tuner.may_submit([])
        assert not tuner.may_submit([cfg] * TRIAL_BATCHES)  # no more trial batches than needed
        for _ in range(TRIAL_BATCHES):
            now[0] += seconds_per_batch
            tuner.done(cfg, cfg.batch)
    assert tuner.chosen == fast and tuner.config == fast
    assert not tuner.may_submit([slow])  # the old setting's batches drain first
    assert tuner.rates[fast] == pytest.approx(80.0) and tuner.rates[slow] == pytest.approx(16.0)
    pinned = Tuner([slow], fixed=True)
    assert pinned.config == slow and pinned.summary()["tuned"] is False
