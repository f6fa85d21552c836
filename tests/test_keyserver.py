"""Attested key release end to end: `infenclave keyserver` and `infenclave serve --keyserver`.

Real processes and sockets on 127.0.0.1: the key server holds the owner's key file and a
policy that allows simulation with the pinned sim signer; the server starts two enclave
workers with fresh state and no owner: they get the model key through the host's relay
(challenge, evidence, sealed key, PROVISION frame) and serve a real photo. Then the test acts
as a hostile host against the key server: a replayed, an unknown and an expired nonce,
another model, evidence of another measurement and of a debug enclave (signed with the real
sim key: real crypto), and a flood. Every refusal is a 403 and an audit-log line.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from infenclave.crypto import ED25519_KEY_SIZE, ed25519_sign, generate_keypair, load_or_create_key_file
from infenclave.enclave.evidence import SIM_SIGNING_KEY_FILE, SimEvidenceProducer
from infenclave.protocol.binding import expected_report_data
from infenclave.protocol.envelope import encode_envelope
from infenclave.protocol.http import KEY_HEADER
from infenclave.protocol.keyrelease import CHALLENGE_PATH, KEY_PATH, encode_key_request
from infenclave.protocol.sim_evidence import sim_body_bytes, sim_evidence_bytes
from test_serving_support import free_port, make_bundle, plain_predictor, sim_client

MODEL = "efficientnet-lite0"
NONCE_TTL_S = 3


def _wait_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited early:\n{log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(log.read_text(errors="replace"))


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def deployment():
    bundle = make_bundle(MODEL)
    work = Path(tempfile.mkdtemp(prefix="infenclave-keyserver-"))
    state = work / "state"
    state.mkdir()
    # The sim signer exists before the server starts, so that the owner's policy can pin it.
    signer = SimEvidenceProducer(state, bytes(32)).signer_public_hex
    policy_doc = json.loads(bundle.policy.read_text())
    policy_doc["sim_signers"] = [signer]
    policy = work / "release-policy.json"
    policy.write_text(json.dumps(policy_doc))
    audit = work / "audit.jsonl"
    ks_port, port = free_port(), free_port()
    ks_log, log = work / "keyserver.log", work / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    keyserver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infenclave.cli",
            "keyserver",
            str(bundle.key),
            "--policy",
            str(policy),
            "--allow-simulation",
            "--listen",
            f"127.0.0.1:{ks_port}",
            "--audit-log",
            str(audit),
            "--nonce-ttl",
            str(NONCE_TTL_S),
            "--rate-burst",
            "30",
            "--rate",
            "0.2",
        ],
        stdout=open(ks_log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = None
    try:
        _wait_port(ks_port, keyserver, ks_log)
        started = time.monotonic()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infenclave.cli",
                "serve",
                str(bundle.bundle),
                "--port",
                str(port),
                "--workers",
                "2",
                "--state",
                str(state),
                "--keyserver",
                f"http://127.0.0.1:{ks_port}",
            ],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        deadline, health = time.monotonic() + 120, {}
        while time.monotonic() < deadline and health.get("workers_ready") != 2:
            if server.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace"))
            try:
                health = httpx.get(url + "/healthz", timeout=5).json()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        ready_s = time.monotonic() - started
        assert health.get("workers_ready") == 2, log.read_text(errors="replace")
        released = [
            line.split("worker ")[1]
            for line in log.read_text(errors="replace").splitlines()
            if "released by the key server" in line
        ]
        print(f"\nserve --keyserver: 2 fresh workers ready {ready_s:.2f} s after start; {released}")
        yield {
            "bundle": bundle,
            "state": state,
            "policy": policy,
            "audit": audit,
            "url": url,
            "ks": f"http://127.0.0.1:{ks_port}",
            "log": log,
            "ready_s": ready_s,
            "ks_log": ks_log,
        }
    finally:
        if server is not None:
            _stop(server)
        _stop(keyserver)
        shutil.rmtree(work, ignore_errors=True)


def _audit(deployment) -> list[dict]:
    return [json.loads(line) for line in deployment["audit"].read_text().splitlines()]


def _challenge(deployment, model_id: str | None = None) -> httpx.Response:
    return httpx.post(
        deployment["ks"] + CHALLENGE_PATH, json={"model_id": model_id or deployment["bundle"].model_id}, timeout=10
    )


def _worker_evidence(deployment, nonce: bytes) -> tuple[bytes, bytes]:
    """What a host relays: one worker's key and evidence envelope over *nonce*."""
    answer = httpx.get(deployment["url"] + "/v1/attestation", params={"nonce": nonce.hex()}, timeout=30).json()
    entry = answer["enclaves"][0]
    return bytes.fromhex(entry["public_key"]), entry["evidence"].encode()


def _ask_key(deployment, model_id: str, nonce: bytes, public_key: bytes, envelope: bytes) -> httpx.Response:
    return httpx.post(
        deployment["ks"] + KEY_PATH, timeout=30, json=encode_key_request(model_id, nonce, public_key, envelope)
    )


def _forged_sim(deployment, nonce: bytes, **claims: object) -> tuple[bytes, bytes]:
    """Sim evidence signed with the installation's real sim key (what a host that can read
    that key, e.g. root, could make): the policy must still refuse what it claims."""
    key = load_or_create_key_file(deployment["state"] / SIM_SIGNING_KEY_FILE, ED25519_KEY_SIZE)
    _, public = generate_keypair()
    policy = json.loads(deployment["policy"].read_text())
    body = sim_body_bytes(
        {
            "tee": "simulated",
            "measurement": policy["measurements"]["sim"][0],
            "report_data": expected_report_data(public, nonce, deployment["bundle"].model_id).hex(),
            "debug": False,
            "issued_at": int(time.time()),
            "signer": policy["sim_signers"][0],
            **claims,
        }
    )
    return public, encode_envelope("simulated", sim_evidence_bytes(body, ed25519_sign(key, body)))


def test_fresh_workers_get_the_key_without_the_owner_and_serve(deployment, photos) -> None:
    assert (deployment["state"] / f"model-key-{deployment['bundle'].model_id}.sealed").exists()
    released = [e for e in _audit(deployment) if e["outcome"] == "released"]
    assert released, deployment["ks_log"].read_text()
    policy = json.loads(deployment["policy"].read_text())
    for entry in released:
        assert entry["model_id"] == deployment["bundle"].model_id and entry["peer"] == "127.0.0.1"
        assert entry["tee"] == "simulated" and entry["measurements"]["measurement"] == policy["measurements"]["sim"][0]
        assert entry["time"].startswith("20") and len(entry["enclave_key"]) == 64
    with sim_client(deployment["url"], deployment["policy"]) as client:  # attests; never provisions
        got = client.classify(photos["coffee"].read_bytes(), k=5)
    plain = plain_predictor(MODEL).predict(photos["coffee"].read_bytes(), 5)
    assert [p.index for p in got] == [p.index for p in plain]


def test_released_key_is_the_model_key_sealed_to_that_enclave(deployment) -> None:
    nonce = bytes.fromhex(_challenge(deployment).json()["nonce"])
    public_key, envelope = _worker_evidence(deployment, nonce)
    answer = _ask_key(deployment, deployment["bundle"].model_id, nonce, public_key, envelope)
    assert answer.status_code == 200, answer.text
    sealed = base64.b64decode(answer.json()["sealed_key"])
    # The enclave opens it and finds the very key it holds already.
    provision = httpx.post(
        deployment["url"] + "/v1/provision",
        content=sealed,
        timeout=30,
        headers={KEY_HEADER: public_key.hex(), "Content-Type": "application/octet-stream"},
    )
    assert provision.status_code == 409 and provision.json()["error"] == "already_provisioned", provision.text
    # The same nonce again: single use.
    again = _ask_key(deployment, deployment["bundle"].model_id, nonce, public_key, envelope)
    assert again.status_code == 403 and again.json() == {"error": "refused"}
    assert "K3 unknown or already used nonce" in _audit(deployment)[-1]["step"]


def test_refusals_are_opaque_and_audited(deployment) -> None:
    model_id = deployment["bundle"].model_id

    def refused(answer: httpx.Response, step: str) -> dict:
        assert answer.status_code == 403 and answer.json() == {"error": "refused"}, answer.text
        entry = _audit(deployment)[-1]
        assert entry["outcome"] == "refused" and step in entry["step"], entry
        return entry

    # Unknown nonce (never issued).
    public_key, envelope = _worker_evidence(deployment, os.urandom(32))
    refused(_ask_key(deployment, model_id, os.urandom(32), public_key, envelope), "K3 unknown")
    # Another model: no challenge for it, and no key for it.
    refused(_challenge(deployment, "ab" * 32), "K2 another model")
    nonce = bytes.fromhex(_challenge(deployment).json()["nonce"])
    refused(_ask_key(deployment, "ab" * 32, nonce, public_key, envelope), "K2 another model")
    # Evidence of another measurement, signed by the pinned signer: step 3e.
    nonce = bytes.fromhex(_challenge(deployment).json()["nonce"])
    entry = refused(
        _ask_key(deployment, model_id, nonce, *_forged_sim(deployment, nonce, measurement="11" * 32)),
        "step 3e (measurement)",
    )
    assert entry["measurements"] == {"measurement": "11" * 32}
    # A debug enclave: step 3c.
    nonce = bytes.fromhex(_challenge(deployment).json()["nonce"])
    entry = refused(
        _ask_key(deployment, model_id, nonce, *_forged_sim(deployment, nonce, debug=True)), "step 3c (debug)"
    )
    assert entry["debug"] is True
    # Evidence for another nonce than the one presented: step 4.
    nonce, other = (bytes.fromhex(_challenge(deployment).json()["nonce"]) for _ in range(2))
    public_key, envelope = _worker_evidence(deployment, other)
    refused(_ask_key(deployment, model_id, nonce, public_key, envelope), "step 4 (report data)")
    # An expired nonce (the key server runs with --nonce-ttl 3).
    nonce = bytes.fromhex(_challenge(deployment).json()["nonce"])
    public_key, envelope = _worker_evidence(deployment, nonce)
    time.sleep(NONCE_TTL_S + 0.3)
    refused(_ask_key(deployment, model_id, nonce, public_key, envelope), "K3 the nonce expired")
    # Malformed: structure refused before anything else.
    answer = httpx.post(deployment["ks"] + KEY_PATH, content=b'{"model_id": 1}', timeout=10)
    refused(answer, "K0 malformed")


def test_a_flooding_peer_is_rate_limited(deployment) -> None:
    codes = [_challenge(deployment).status_code for _ in range(40)]
    assert 429 in codes and codes[0] in (200, 429)
    assert any(e["outcome"] == "rate_limited" and e["peer"] == "127.0.0.1" for e in _audit(deployment))
