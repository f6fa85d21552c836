"""Label leakage from IR2: with public weights the host names the label, so the Tail protects nothing."""

from __future__ import annotations

import pytest


def test_lite0_default_tail_leaks_the_label_to_a_host_with_the_public_head(lite0_net) -> None:
    from infenclave.assess.attacks import load_eval_images
    from infenclave.assess.label_leakage import LEAKAGE_VIEWS, NEAR_CHANCE, measure
    from infenclave.assess.plan import default_tail_start

    tail = default_tail_start(lite0_net).name
    photos = load_eval_images()  # the 8 built-in photos, 5 views each
    doc = measure(lite0_net, photos, None, tail_starts=[tail])
    (row,) = doc["rows"]
    assert row["tail_start"] == tail and row["inputs"] == len(photos) * LEAKAGE_VIEWS
    assert row["rate"] == 1.0 and row["lower_bound"] > 0.9  # ~100%, far above chance
    assert row["chance"] < 0.5 and not row["near_chance"]
    assert doc["recommended_tail_start"] is None
    assert "protects nothing" in doc["summary"]
    assert NEAR_CHANCE == pytest.approx(0.05)
