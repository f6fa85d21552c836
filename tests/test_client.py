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

from infenclave.client import Client, resolve_policy
from infenclave.crypto import generate_keypair, seal
from infenclave.errors import PolicyError, UsageError, VerificationError
from infenclave.protocol.messages import encode_request, request_context
from test_serving_support import ServerProcess, make_bundle, plain_predictor, sim_client

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


def _policy_doc(bundle) -> dict:
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
    policy.write_text(
        json.dumps({"tee_types": ["sgx"], "measurements": {"mrenclave": ["ab" * 32]}, "model_ids": [bundle.model_id]})
    )
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
        resolve_policy(
            {"tee_types": ["sgx"], "measurements": {"mrenclave": ["ab" * 32]}, "model_ids": ["cd" * 32]},
            allow_simulation=True,
        )


def test_key_for_another_model_is_not_sent(server, bundle, tmp_path) -> None:
    from infenclave.bundle import ModelKey, write_key_file

    other = tmp_path / "other.key"
    write_key_file(other, ModelKey("cd" * 32, os.urandom(32)))
    requests = Requests()
    client = sim_client(server.url, bundle.policy, http=requests.http())
    with pytest.raises(UsageError, match="refusing to send the key"):
        client.provision(other)
    assert ("POST", "/v1/provision") not in requests.seen


def _post(server, key_id: str, request_id: str, sealed: bytes) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/classify",
        content=sealed,
        timeout=60,
        headers={"X-Infenclave-Enclave-Key": key_id, "X-Infenclave-Request-Id": request_id},
    )


def test_request_sealed_for_another_model_or_session_is_refused(server, bundle, photos) -> None:
    client = sim_client(server.url, bundle.policy)
    first, second = client.attest()
    image = photos["coffee"].read_bytes()
    _, reply_public = generate_keypair()

    # Another model: sealed to a real attested key, but for another model id.
    request_id = os.urandom(16).hex()
    sealed = seal(
        first.public_key, encode_request(image, reply_public, 5), context=request_context("ee" * 32, request_id)
    )
    answer = _post(server, first.key_id, request_id, sealed)
    assert answer.status_code == 400 and answer.json()["error"] == "enclave_refused"

    # Another session: sealed to worker 0's key, delivered to worker 1.
    request_id = os.urandom(16).hex()
    sealed = seal(
        first.public_key, encode_request(image, reply_public, 5), context=request_context(client.model_id, request_id)
    )
    answer = _post(server, second.key_id, request_id, sealed)
    assert answer.status_code == 400 and answer.json()["error"] == "enclave_refused"
    # The same ciphertext to the right worker is served: the refusals were about the binding.
    assert _post(server, first.key_id, request_id, sealed).status_code == 200
    client.close()


def test_classify_cli_json_matches_predict_shape(server, bundle, photos) -> None:
    image = photos["china"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "infenclave.cli",
            "classify",
            "--url",
            server.url,
            "--policy",
            str(bundle.policy),
            "--allow-simulation",
            "--json",
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "SIMULATED" in out.stderr  # the warning, on every run
    (result,) = json.loads(out.stdout)
    assert result["file"] == str(image)
    predictions = result["predictions"]
    plain = plain_predictor(MODEL).predict(image.read_bytes(), 5)
    assert [p["index"] for p in predictions] == [p.index for p in plain]
    assert set(predictions[0]) == {"index", "label", "prob"}

    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "infenclave.cli",
            "classify",
            "--url",
            server.url,
            "--policy",
            str(bundle.policy),
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 3 and "simulation is not allowed" in refused.stderr  # REFUSED
    assert refused.stdout == ""


def test_classify_cli_names_a_bad_file_and_classifies_the_rest(server, bundle, photos, tmp_path) -> None:
    bad = tmp_path / "notimage.jpg"
    bad.write_bytes(b"GIF89a" + b"\0" * 100)
    missing = tmp_path / "missing.png"
    files = [photos["coffee"], bad, missing, photos["chelsea"]]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "infenclave.cli",
            "classify",
            "--url",
            server.url,
            "--policy",
            str(bundle.policy),
            "--allow-simulation",
            "--json",
            "-k",
            "1",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr  # ExitCode.USAGE, after the good ones were classified
    assert f"error: {bad}: image refused" in out.stderr
    assert f"cannot read image file {missing}" in out.stderr
    assert "2 of 4 images could not be classified" in out.stderr
    doc = json.loads(out.stdout)
    assert [r["file"] for r in doc] == [str(f) for f in files]
    assert doc[0]["predictions"][0]["label"] == "espresso" and "predictions" in doc[3]
    assert "error" in doc[1] and "error" in doc[2]


def test_exit_codes_say_which_kind_of_failure(server, bundle, photos, tmp_path) -> None:
    """One table for every command: 2 usage, 3 refused, 5 server or network."""
    from test_serving_support import free_port

    def classify(url: str, policy, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "infenclave.cli",
                "classify",
                "--url",
                url,
                "--policy",
                str(policy),
                "--allow-simulation",
                *extra,
                str(photos["coffee"]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    nobody = classify(f"http://127.0.0.1:{free_port()}", bundle.policy)
    assert nobody.returncode == 5 and "cannot reach" in nobody.stderr  # ExitCode.SERVER
    doc = _policy_doc(bundle)
    doc["model_ids"], doc["model_signers"] = ["cd" * 32], []  # the policy names another model
    other = tmp_path / "other-model.json"
    other.write_text(json.dumps(doc))
    mismatch = classify(server.url, other)
    assert mismatch.returncode == 3 and "does not name" in mismatch.stderr  # ExitCode.REFUSED
    usage = classify(server.url, bundle.policy, "--top", "0")
    assert usage.returncode == 2  # ExitCode.USAGE


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
    for args, message in (
        (["--tee", "gramine-sgx"], "--gramine-dir"),
        (["--tee", "tdx"], "--tee"),
        (["--device", "tpu"], "--device"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "infenclave.cli", "serve", str(bundle.bundle), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "infenclave.cli", "serve", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "not a bundle" in out.stderr


def test_classify_takes_a_path_or_bytes_and_a_batch(server, bundle, photos, tmp_path) -> None:
    from infenclave.errors import ImageError

    client = sim_client(server.url, bundle.policy)
    coffee = photos["coffee"]
    answers = [client.classify(x, k=3) for x in (coffee, str(coffee), coffee.read_bytes())]
    assert [[p.index for p in a] for a in answers] == [[p.index for p in answers[0]]] * 3
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a" + b"\0" * 100)
    results = client.classify_batch([coffee, bad, photos["chelsea"].read_bytes()], k=1, return_image_errors=True)
    assert results[0][0].label == "espresso" and isinstance(results[2], list)
    assert isinstance(results[1], ImageError) and str(bad) in str(results[1])
    with pytest.raises(ImageError, match="bad.png"):
        client.classify_batch([coffee, bad])
    with pytest.raises(ImageError, match="empty"):
        client.classify(b"")
    client.close()


def test_attest_reads_a_saved_attestation_answer(server, bundle, tmp_path) -> None:
    nonce = os.urandom(32).hex()
    answer = tmp_path / "attestation.json"
    answer.write_bytes(httpx.get(f"{server.url}/v1/attestation", params={"nonce": nonce}).content)
    doc = _policy_doc(bundle)
    doc.update(allow_simulation=True, tee_types=sorted({*doc.get("tee_types", []), "simulated"}))
    policy = tmp_path / "sim-allowed.json"
    policy.write_text(json.dumps(doc))

    def attest(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infenclave.cli", "attest", str(answer), "--policy", str(policy), "--json", *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )

    accepted = attest("--nonce", nonce)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    result = json.loads(accepted.stdout)
    assert result["verdict"] == "accepted" and result["model_id"] == bundle.model_id
    assert len(result["enclaves"]) == 2 and all(e["report_data_checked"] for e in result["enclaves"])
    stale = attest("--nonce", os.urandom(32).hex())  # another nonce: the binding does not hold
    assert stale.returncode == 3 and "refused" in json.loads(stale.stdout)["verdict"]
    bad_nonce = attest("--nonce", "xyz")
    assert bad_nonce.returncode == 2 and "--nonce" in bad_nonce.stderr
