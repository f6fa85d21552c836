"""Plain prediction on real weights and real photos, and the CLI around it."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from infenclave.models import load_model
from infenclave.predict import Predictor

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_lite0_sees_a_cat_and_an_espresso(lite0, photos) -> None:
    p = Predictor(lite0)
    assert {x.index for x in p.predict(photos["chelsea"].read_bytes(), 5)} & CAT_CLASSES
    top = p.predict(photos["coffee"].read_bytes(), 5)
    assert top[0].index == ESPRESSO and top[0].label == "espresso"
    assert sum(x.prob for x in top) <= 1.0 + 1e-9


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_bigger_zoo_models_load_strictly_and_agree(name: str, photos) -> None:
    p = Predictor(load_model(name))
    assert {x.index for x in p.predict(photos["chelsea"].read_bytes(), 5)} & CAT_CLASSES
    assert ESPRESSO in {x.index for x in p.predict(photos["coffee"].read_bytes(), 5)}


def test_predict_cli_json(photos) -> None:
    res = run_cli(
        "predict", "efficientnet-lite0", str(photos["coffee"]), str(photos["chelsea"]), "--json", "--top", "3"
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["file"] for r in doc] == [str(photos["coffee"]), str(photos["chelsea"])]
    assert all(len(r["predictions"]) == 3 for r in doc)
    first = doc[0]["predictions"][0]
    assert first == {"index": ESPRESSO, "label": "espresso", "prob": pytest.approx(first["prob"])}
    assert set(doc[1]["predictions"][0]) == {"index", "label", "prob"}


def test_predict_names_a_bad_file_and_classifies_the_rest(photos, tmp_path) -> None:
    bad = tmp_path / "notimage.jpg"
    bad.write_text("not an image")
    res = run_cli(
        "predict", "efficientnet-lite0", str(photos["coffee"]), str(bad), str(photos["chelsea"]), "--json", "--top", "1"
    )
    assert res.returncode == 2  # ExitCode.USAGE, at the end
    assert f"error: {bad}: not a recognised image file" in res.stderr
    doc = json.loads(res.stdout)
    assert [r["file"] for r in doc] == [str(photos["coffee"]), str(bad), str(photos["chelsea"])]
    assert doc[0]["predictions"][0]["index"] == ESPRESSO and "predictions" in doc[2]
    assert doc[1] == {"file": str(bad), "error": "not a recognised image file"}
    human = run_cli("predict", "efficientnet-lite0", str(bad), str(photos["coffee"]), "-k", "1")
    assert human.returncode == 2 and "espresso" in human.stdout and str(bad) in human.stderr
