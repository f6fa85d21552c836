"""Confidential top-5 equals plain top-5 for the other zoo models (Lite1, Lite2), end to end.

Lite0 is covered on every built-in photo by test_serving.py; here each larger model gets its
own bundle and server (two sim enclave workers) and two real photos.
"""

from __future__ import annotations

import pytest

from test_serving_support import ServerProcess, assert_same_top5, make_bundle, plain_predictor, sim_client


@pytest.mark.slow
@pytest.mark.parametrize("model", ["efficientnet-lite1", "efficientnet-lite2"])
def test_confidential_top5_equals_plain(model: str, photos) -> None:
    bundle = make_bundle(model)
    server = ServerProcess(bundle.bundle, workers=2)
    try:
        client = sim_client(server.url, bundle.policy)
        client.provision(bundle.key)
        predictor = plain_predictor(model)
        for name in ("chelsea", "motorcycle"):
            image = photos[name].read_bytes()
            assert_same_top5(client.classify(image, 5), predictor.predict(image, 5))
        client.close()
    finally:
        server.stop()
