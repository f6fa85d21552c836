"""The client refuses before it sends anything; sealed requests do not cross models or sessions.

A real server (two sim enclave workers, Lite0) on a free 127.0.0.1 port; every request the
client makes is recorded through httpx event hooks on the real socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
from test_serving_support import ServerProcess, make_bundle, plain_predictor, sim_client

from infenclave.client import Client, resolve_policy
from infenclave.crypto import generate_keypair, seal
from infenclave.errors import PolicyError, UsageError, VerificationError
from infenclave.protocol.messages import encode_request, request_context

MODEL = "efficientnet-lite0"


class Requests:
    """(method, path) of every request a client makes."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def hook(self, request: httpx.Request) -> None:
        with self._lock:
            self.seen.append((request.method, request.url.path))

    def http(self) -> httpx.Client:
        return httpx.Client(timeout=60, event_hooks={"request": [self.hook]})


@pytest.fixture(scope="module")
def bundle():
    return make_bundle(MODEL)


@pytest.fixture(scope="module")
def server(bundle):
    proc = ServerProcess(bundle.bundle, workers=2)
    owner = sim_client(proc.url, bundle.policy)
    owner.provision(bundle.key)
    owner.close()
    yield proc
    proc.stop()


def _policy_doc(bundle) -> dict:  # noqa: ANN001
    return json.loads(bundle.policy.read_text())


def test_starter_policy_refuses_simulation_before_any_request(server, bundle) -> None:
    requests = Requests()
    with pytest.raises(VerificationError, match="simulation is not allowed"):
        Client(server.url, bundle.policy, http=requests.http())
    assert requests.seen == []


def test_wrong_measurement_is_refused_before_anything_is_sent(server, bundle, photos, tmp_path) -> None:
    doc = _policy_doc(bundle)
    doc["measurements"]["sim"] = ["00" * 32]
    policy = tmp_path / "wrong.json"
    policy.write_text(json.dumps(doc))
    requests = Requests()
    client = sim_client(server.url, policy, http=requests.http())
    with pytest.raises(VerificationError, match="step 3e"):
        client.classify(photos["chelsea"].read_bytes())
    with pytest.raises(VerificationError, match="step 3e"):
        client.provision(bundle.key)
    # Only the evidence was asked for (a nonce goes out, nothing else).
    assert set(requests.seen) == {("GET", "/v1/attestation")}


def test_hardware_only_policy_refuses_simulated_evidence(server, bundle, photos, tmp_path) -> None:
    policy = tmp_path / "sgx.json"
    policy.write_text(json.dumps({"tee_types": ["sgx"], "measurements": {"mrenclave": ["ab" * 32]},
                                  "model_ids": [bundle.model_id]}))
    requests = Requests()
    client = Client(server.url, policy, http=requests.http())
    with pytest.raises(VerificationError, match="step 3a"):
        client.classify(photos["chelsea"].read_bytes())
    assert set(requests.seen) == {("GET", "/v1/attestation")}


def test_allow_simulation_keeps_the_measurement_check(bundle) -> None:
    policy = resolve_policy(bundle.policy, allow_simulation=True)
    assert policy.unsafe_allows_simulation and "simulated" in policy.tee_types
    assert policy.measurements.sim == tuple(_policy_doc(bundle)["measurements"]["sim"])
    with pytest.raises(PolicyError, match="no sim measurement"):
        resolve_policy({"tee_types": ["sgx"], "measurements": {"mrenclave": ["ab" * 32]},
                        "model_ids": ["cd" * 32]}, allow_simulation=True)


def test_key_for_another_model_is_not_sent(server, bundle, tmp_path) -> None:
    from infenclave.bundle import ModelKey, write_key_file

    other = tmp_path / "other.key"
    write_key_file(other, ModelKey("cd" * 32, os.urandom(32)))
    requests = Requests()
    client = sim_client(server.url, bundle.policy, http=requests.http())
    with pytest.raises(UsageError, match="refusing to send the key"):
        client.provision(other)
    assert ("POST", "/v1/provision") not in requests.seen


def _post(server, key_id: str, request_id: str, sealed: bytes) -> httpx.Response:  # noqa: ANN001
    return httpx.post(server.url + "/v1/classify", content=sealed, timeout=60,
                      headers={"X-Infenclave-Enclave-Key": key_id, "X-Infenclave-Request-Id": request_id})


def test_request_sealed_for_another_model_or_session_is_refused(server, bundle, photos) -> None:
    client = sim_client(server.url, bundle.policy)
    first, second = client.attest()
    image = photos["coffee"].read_bytes()
    _, reply_public = generate_keypair()

    # Another model: sealed to a real attested key, but for another model id.
    request_id = os.urandom(16).hex()
    sealed = seal(first.public_key, encode_request(image, reply_public, 5),
                  context=request_context("ee" * 32, request_id))
    answer = _post(server, first.key_id, request_id, sealed)
    assert answer.status_code == 400 and answer.json()["error"] == "enclave_refused"

    # Another session: sealed to worker 0's key, delivered to worker 1.
    request_id = os.urandom(16).hex()
    sealed = seal(first.public_key, encode_request(image, reply_public, 5),
                  context=request_context(client.model_id, request_id))
    answer = _post(server, second.key_id, request_id, sealed)
    assert answer.status_code == 400 and answer.json()["error"] == "enclave_refused"
    # The same ciphertext to the right worker is served: the refusals were about the binding.
    assert _post(server, first.key_id, request_id, sealed).status_code == 200
    client.close()


def test_classify_cli_json_matches_predict_shape(server, bundle, photos) -> None:
    image = photos["china"]
    out = subprocess.run(
        [sys.executable, "-m", "infenclave.cli", "classify", "--url", server.url, "--policy",
         str(bundle.policy), "--allow-simulation", "--json", str(image)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "SIMULATED" in out.stderr  # the warning, on every run
    (predictions,) = json.loads(out.stdout)
    plain = plain_predictor(MODEL).predict(image.read_bytes(), 5)
    assert [p["index"] for p in predictions] == [p.index for p in plain]
    assert set(predictions[0]) == {"index", "label", "prob"}

    refused = subprocess.run(
        [sys.executable, "-m", "infenclave.cli", "classify", "--url", server.url, "--policy",
         str(bundle.policy), str(image)],
        capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 2 and "simulation is not allowed" in refused.stderr
    assert refused.stdout == ""


def test_provisioning_twice_is_harmless(server, bundle) -> None:
    client = sim_client(server.url, bundle.policy)
    assert client.provision(bundle.key) == 2
    client.close()


def test_image_refusal_reaches_the_client_only(server, bundle) -> None:
    from infenclave.errors import ImageError

    client = sim_client(server.url, bundle.policy)
    with pytest.raises(ImageError, match="image refused") as refused:
        client.classify(b"GIF89a" + b"\0" * 100)
    client.close()
    reason = str(refused.value).split(": ", 1)[1]  # e.g. "not a recognised image file"
    assert reason and reason not in server.log()  # the host's log only says that one was refused


def test_serve_refuses_bad_options(bundle, tmp_path) -> None:
    for args, message in ((["--tee", "gramine-sgx"], "--gramine-dir"), (["--tee", "tdx"], "--tee"),
                          (["--device", "tpu"], "--device")):
        out = subprocess.run([sys.executable, "-m", "infenclave.cli", "serve", str(bundle.bundle), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "infenclave.cli", "serve", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a bundle" in out.stderr
