"""The KL method for a model with few classes: an ImageNet oracle judges instead of the model.

With 2 classes KL(p || uniform) <= log 2 = 0.69 nats, so the model judging its own projected
maps calls nearly every cut unsafe. The model here is Lite0 with a 2-class head (animal vs not,
by Lite0's own ImageNet top-1 on offline training photos), trained in seconds, seeded.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

MODULE = """
import numpy as np
import torch
from pathlib import Path
from infenclave.models import zoo


def build():
    model = zoo.build_module(zoo.ZOO["efficientnet-lite0"])
    head = np.load(Path(__file__).with_name("head.npz"), allow_pickle=False)
    fc = torch.nn.Linear(head["weight"].shape[1], 2)
    fc.load_state_dict({"weight": torch.from_numpy(head["weight"]),
                        "bias": torch.from_numpy(head["bias"])}, strict=True)
    model._fc = fc
    return model.eval()
"""
ANIMAL_CLASSES = 398  # ImageNet indices 0-397 are animals


@pytest.fixture(scope="module")
def two_class_spec(lite0, lite0_net, tmp_path_factory):
    import torch

    from infenclave.assess.attacks._front import OnnxFront
    from infenclave.assess.attacks.training_data import augment, training_photos
    from infenclave.enclave.imaging import normalise

    folder = tmp_path_factory.mktemp("twoclass")
    photos = training_photos().photos[:24]
    views = augment(photos, 96, lite0.preprocess.input_hw, np.random.default_rng(0))
    feats = OnnxFront(lite0_net, "_conv_head")(views).mean(axis=(2, 3))  # (N, 1280)
    with torch.no_grad():
        logits = lite0.torch_module(torch.from_numpy(normalise(views, lite0.preprocess)))
    y = torch.from_numpy((logits.argmax(1).numpy() < ANIMAL_CLASSES).astype(np.int64))
    torch.manual_seed(0)
    fc = torch.nn.Linear(feats.shape[1], 2)
    opt = torch.optim.Adam(fc.parameters(), lr=1e-2)
    x = torch.from_numpy(feats)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(fc(x), y).backward()
        opt.step()
    np.savez(folder / "head.npz", weight=fc.weight.detach().numpy(), bias=fc.bias.detach().numpy())
    (folder / "twoclass_lite0.py").write_text(MODULE)
    (folder / "labels.txt").write_text("animal\nnot an animal\n")
    (folder / "model.yaml").write_text(
        textwrap.dedent("""\
        name: lite0-two-class
        torch: twoclass_lite0:build
        labels: labels.txt
        preprocess: {resize: 256, crop: 224, mean: [127, 127, 127], std: [128, 128, 128]}
        """)
    )
    return folder / "model.yaml"


def test_two_class_model_gets_a_usable_kl_verdict(two_class_spec, photos, tmp_path) -> None:
    from infenclave.assess.command import AssessOptions, run_assess

    out = tmp_path / "o"
    run_assess(AssessOptions(model=str(two_class_spec), images=[photos["coffee"]], out=out, adversary="passive"))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["num_classes"] == 2
    assert plan["oracle"]["name"] == "efficientnet-lite0" and not plan["oracle"]["same_as_model"]
    assert "judges each projected map against its own prediction" in plan["oracle"]["note"]
    assert plan["images"][0]["delta"] > np.log(2)  # over 1000 classes, not 2
    assert plan["recommendation"]["verdict"] == "safe", plan["recommendation"]["reason"]
    statuses = [c["status"] for c in plan["cuts"] if c["assessable"]]
    assert "safe" in statuses and statuses[0] == "unsafe"  # the input side still reveals
