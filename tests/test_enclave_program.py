"""The enclave program as a real process over a real socketpair, driven frame by frame.

No HTTP and no host code: the test plays a (possibly malicious) host, so it can send what an
honest host never would — a request sealed for another model or another enclave, a replay,
a wrong IR2 — and check that the enclave refuses each, opaquely, and keeps serving.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from infenclave.bundle import read_key_file, sim_measurement
from infenclave.crypto import generate_keypair, open_sealed, seal
from infenclave.protocol.frames import (
    Frame,
    FrameReader,
    MsgType,
    encode_frame,
    tensor_from_frame,
    tensor_meta,
    tensors_meta,
    write_frame,
)
from infenclave.protocol.messages import (
    encode_request,
    provision_context,
    request_context,
    response_context,
)
from test_serving_support import make_bundle, plain_predictor

MODEL = "efficientnet-lite0"


class Enclave:
    """One enclave process; `call` sends a frame and returns the answer with the same tag."""

    def __init__(self, bundle: Path, state: Path) -> None:
        parent, child = socket.socketpair()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infenclave.enclave",
                "--tee",
                "sim",
                "--channel",
                "stdio",
                "--bundles",
                str(bundle.parent),
                "--state",
                str(state),
            ],
            stdin=child,
            stdout=child,
            stderr=subprocess.PIPE,
        )
        child.close()
        self.sock = parent
        self.reader = FrameReader(parent.fileno())
        self._tag = 0
        hello = self.reader.read()
        assert hello is not None and hello.type == MsgType.HELLO, self.stderr()
        self.hello = hello.meta
        self.public_key = bytes.fromhex(hello.meta["public_key"])
        self.bundle = bundle

    def call(
        self, msg: MsgType, meta: dict | None = None, body: bytes | memoryview = b"", tag: int | None = None
    ) -> Frame:
        if tag is None:
            self._tag += 1
            tag = self._tag
        write_frame(self.sock.fileno(), encode_frame(msg, tag, meta, body))
        frame = self.reader.read()
        assert frame is not None, self.stderr()
        assert frame.tag == tag
        return frame

    def stderr(self) -> str:
        self.close()
        return self.process.stderr.read().decode() if self.process.stderr else ""

    def close(self) -> None:
        self.sock.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def bundles():
    # Two bundles of the same model cut differently: two models with different ids.
    return make_bundle(MODEL), make_bundle(MODEL, "_blocks.4", "_conv_head")


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("enclave-state")


@pytest.fixture(scope="module")
def enclave_a(bundles, state):
    enclave = _ready(bundles[0], state)
    yield enclave
    enclave.close()


@pytest.fixture(scope="module")
def enclave_b(bundles, state):
    enclave = _ready(bundles[1], state)
    yield enclave
    enclave.close()


def _ready(bundle, state: Path) -> Enclave:
    enclave = Enclave(bundle.bundle, state)
    loaded = enclave.call(MsgType.LOAD, {"bundle": bundle.bundle.name})
    assert loaded.type == MsgType.LOADED and loaded.meta["model_id"] == bundle.model_id
    key = read_key_file(bundle.key)
    sealed = seal(enclave.public_key, key.key, context=provision_context(key.model_id))
    provisioned = enclave.call(MsgType.PROVISION, body=sealed)
    assert provisioned.type == MsgType.PROVISIONED, enclave.stderr()
    enclave.sealed_blob = bytes(provisioned.body)  # type: ignore[attr-defined]
    return enclave


def _request(
    enclave: Enclave,
    model_id: str,
    image: bytes,
    *,
    k: int = 5,
    recipient: bytes | None = None,
    request_id: str | None = None,
):
    request_id = request_id or os.urandom(16).hex()
    reply_private, reply_public = generate_keypair()
    sealed = seal(
        recipient or enclave.public_key,
        encode_request(image, reply_public, k),
        context=request_context(model_id, request_id),
    )
    return request_id, reply_private, sealed


def _classify(enclave: Enclave, bundle, image: bytes, backnet) -> list[dict]:
    request_id, reply_private, sealed = _request(enclave, bundle.model_id, image)
    ir1 = enclave.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert ir1.type == MsgType.IR1
    x = tensor_from_frame(ir1)
    outputs = backnet(x)  # [IR2, *what the enclave checks it with] (a verified BackNet)
    result = enclave.call(
        MsgType.IR2, tensors_meta(outputs), b"".join(memoryview(y).cast("B") for y in outputs), tag=ir1.tag
    )
    assert result.type == MsgType.RESULT
    answer = open_sealed(reply_private, bytes(result.body), context=response_context(bundle.model_id, request_id))
    return json.loads(answer)["predictions"]


@pytest.fixture(scope="module")
def backnet_a(bundles):
    from infenclave.bundle import read_backnet, read_manifest
    from infenclave.host.backnet import BackNet

    bundle = bundles[0].bundle
    return BackNet(read_backnet(bundle, read_manifest(bundle)))


def test_hello_reports_sandbox_and_measurement(enclave_a) -> None:
    hello = enclave_a.hello
    assert hello["tee"] == "simulated"
    assert hello["measurement"] == sim_measurement().hex()
    sandbox = hello["sandbox"]
    assert sandbox["seccomp_filter"] and sandbox["not_dumpable"] and sandbox["no_new_privs"]


def test_evidence_binds_key_and_nonce(enclave_a, bundles) -> None:
    from infenclave.attest import Evidence, PolicyRefusal, verify
    from infenclave.client import resolve_policy
    from infenclave.protocol.binding import expected_report_data

    nonce = os.urandom(32)
    frame = enclave_a.call(MsgType.EVIDENCE, {"nonce": nonce.hex()})
    assert frame.type == MsgType.EVIDENCE_OK
    evidence = Evidence(tee="simulated", raw=bytes(frame.body))
    policy = resolve_policy(bundles[0].policy, allow_simulation=True)
    now = datetime.now(UTC)
    model_id = bundles[0].model_id
    claims = verify(
        evidence, policy, expected_report_data=expected_report_data(enclave_a.public_key, nonce, model_id), now=now
    )
    assert claims.measurements["measurement"] == sim_measurement().hex()
    # Another nonce, another key or another model is not what this evidence binds.
    for key, other_nonce, other_model in (
        (enclave_a.public_key, os.urandom(32), model_id),
        (os.urandom(32), nonce, model_id),
        (enclave_a.public_key, nonce, bundles[1].model_id),
    ):
        with pytest.raises(PolicyRefusal, match="step 4"):
            verify(evidence, policy, expected_report_data=expected_report_data(key, other_nonce, other_model), now=now)
    short = enclave_a.call(MsgType.EVIDENCE, {"nonce": "00" * 8})
    assert short.type == MsgType.ERROR and short.meta["error"] == "bad_nonce"


def test_classification_matches_plain(enclave_a, bundles, backnet_a, photos) -> None:
    image = photos["chelsea"].read_bytes()
    predictions = _classify(enclave_a, bundles[0], image, backnet_a)
    plain = plain_predictor(MODEL).predict(image, 5)
    assert [p["index"] for p in predictions] == [p.index for p in plain]
    np.testing.assert_allclose([p["prob"] for p in predictions], [p.prob for p in plain], atol=1e-4)


def test_request_for_another_model_is_refused(enclave_a, enclave_b, bundles, backnet_a, photos) -> None:
    image = photos["coffee"].read_bytes()
    # Sealed to enclave B's key but with model A's id: B serves model B and cannot open it.
    request_id, _, sealed = _request(enclave_b, bundles[0].model_id, image)
    refused = enclave_b.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert refused.type == MsgType.ERROR and refused.meta["error"] == "refused"
    # The owner's key of model A, sealed to B with A's id: refused (B has its own key anyway).
    key_a = read_key_file(bundles[0].key)
    wrong = seal(enclave_b.public_key, key_a.key, context=provision_context(bundles[1].model_id))
    assert enclave_b.call(MsgType.PROVISION, body=wrong).type == MsgType.ERROR
    # Both still serve their own clients.
    assert _classify(enclave_a, bundles[0], image, backnet_a)[0]["label"] == "espresso"


def test_request_for_another_session_is_refused(enclave_a, enclave_b, bundles, backnet_a, photos) -> None:
    image = photos["coffee"].read_bytes()
    # Sealed for enclave B's key (another session), relayed by the host to enclave A.
    request_id, _, sealed = _request(enclave_a, bundles[0].model_id, image, recipient=enclave_b.public_key)
    refused = enclave_a.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert refused.type == MsgType.ERROR and refused.meta["error"] == "refused"
    # Same ciphertext under another request id: the context differs, so it does not open.
    request_id, _, sealed = _request(enclave_a, bundles[0].model_id, image)
    moved = enclave_a.call(MsgType.REQUEST, {"request_id": os.urandom(16).hex()}, sealed)
    assert moved.type == MsgType.ERROR


def test_replay_and_bad_ir2_are_refused(enclave_a, bundles, photos) -> None:
    image = photos["rocket"].read_bytes()
    request_id, _, sealed = _request(enclave_a, bundles[0].model_id, image)
    first = enclave_a.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert first.type == MsgType.IR1
    replay = enclave_a.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert replay.type == MsgType.ERROR  # the same request id again: a replay
    shape = (1, *loaded_tail_shape(bundles[0]))
    bad = np.full(shape, np.nan, dtype=np.float32)
    nan = enclave_a.call(MsgType.IR2, tensor_meta(bad), memoryview(bad).cast("B"), tag=first.tag)
    assert nan.type == MsgType.ERROR
    # The pending request is gone after a refusal: a second IR2 for it finds nothing.
    good = np.zeros(shape, dtype=np.float32)
    again = enclave_a.call(MsgType.IR2, tensor_meta(good), memoryview(good).cast("B"), tag=first.tag)
    assert again.type == MsgType.ERROR
    request_id, _, sealed = _request(enclave_a, bundles[0].model_id, image)
    second = enclave_a.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    wrong = np.zeros((1, 7, 7, 1280), dtype=np.float32)
    shaped = enclave_a.call(MsgType.IR2, tensor_meta(wrong), memoryview(wrong).cast("B"), tag=second.tag)
    assert shaped.type == MsgType.ERROR


def test_image_refusal_is_sealed_to_the_client(enclave_a, bundles) -> None:
    request_id, reply_private, sealed = _request(enclave_a, bundles[0].model_id, b"not an image at all")
    frame = enclave_a.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert frame.type == MsgType.RESULT  # the host cannot tell a refusal from an answer
    answer = json.loads(
        open_sealed(reply_private, bytes(frame.body), context=response_context(bundles[0].model_id, request_id))
    )
    assert answer["error"].startswith("image refused")


def test_restarted_enclave_unseals_without_the_owner(enclave_a, bundles, state, backnet_a, photos) -> None:
    restarted = Enclave(bundles[0].bundle, state)
    try:
        assert restarted.public_key != enclave_a.public_key  # a fresh key pair per process
        restarted.call(MsgType.LOAD, {"bundle": bundles[0].bundle.name})
        tampered = bytearray(enclave_a.sealed_blob)
        tampered[-1] ^= 1
        assert restarted.call(MsgType.UNSEAL, body=bytes(tampered)).type == MsgType.ERROR
        assert restarted.call(MsgType.UNSEAL, body=enclave_a.sealed_blob).type == MsgType.UNSEALED
        image = photos["flower"].read_bytes()
        plain = plain_predictor(MODEL).predict(image, 5)
        assert [p["index"] for p in _classify(restarted, bundles[0], image, backnet_a)] == [p.index for p in plain]
    finally:
        restarted.close()


def test_other_installation_cannot_unseal(enclave_a, bundles, tmp_path) -> None:
    other = Enclave(bundles[0].bundle, tmp_path)  # another per-installation sim secret
    try:
        other.call(MsgType.LOAD, {"bundle": bundles[0].bundle.name})
        assert other.call(MsgType.UNSEAL, body=enclave_a.sealed_blob).type == MsgType.ERROR
    finally:
        other.close()


def test_bundle_name_cannot_escape(bundles, tmp_path) -> None:
    enclave = Enclave(bundles[0].bundle, tmp_path)
    try:
        for name in ("..", "../etc", "a/b", "", ".hidden"):
            frame = enclave.call(MsgType.LOAD, {"bundle": name})
            assert frame.type == MsgType.ERROR and frame.meta["error"] == "bad_bundle"
        not_loaded = enclave.call(MsgType.REQUEST, {"request_id": "ab" * 16}, b"x" * 64)
        assert not_loaded.type == MsgType.ERROR and not_loaded.meta["error"] == "not_loaded"
    finally:
        enclave.close()


def loaded_tail_shape(bundle) -> tuple[int, ...]:
    from infenclave.bundle import read_manifest

    return read_manifest(bundle.bundle).tail_start.shape


def test_enclave_imports_stay_in_the_tcb(bundles, tmp_path) -> None:
    """The enclave refuses to start if an unmeasured project module is loaded; here it starts,
    and none of torch, the host, the models or the attest verifier is in the process."""
    code = (
        "import sys\n"
        "sys.argv = ['x', '--tee', 'sim', '--bundles', sys.argv[1], '--state', sys.argv[2]]\n"
        "import infenclave.enclave.__main__ as m\n"
        "import infenclave.enclave.program\n"
        "bad = [n for n in sys.modules if n.split('.')[0] == 'torch' or n.startswith(('infenclave.host', "
        "'infenclave.models', 'infenclave.attest.verifier', 'infenclave.attest.policy', 'infenclave.client', "
        "'infenclave.bundle', 'httpx', 'fastapi', 'uvicorn', 'dcap_qvl'))]\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bundles[0].bundle.parent), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "BAD []" in out.stdout, out.stdout + out.stderr
