"""The host is the attacker: each attack it tried is now refused, end to end.

Real `infenclave partition` bundles, real `infenclave serve` processes on 127.0.0.1, real enclave
processes, real crypto. The host here does only what a host can: partition and serve bundles of
its own (with its own keys), edit files it stores, relay or replace bytes, act as a client.
The IR2-level attacks (swap, the Tail as an oracle, zeros, permutation, noise) are played
against the enclave in `tests/test_verified_backnet.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import httpx
import onnx
import pytest
from onnx import external_data_helper

from infenclave.bundle import (
    owner_key_path_for,
    partition,
    read_key_file,
    read_manifest,
)
from infenclave.client import Client, SimulationWarning
from infenclave.crypto import (
    ED25519_KEY_SIZE,
    aead_encrypt,
    ed25519_sign,
    load_or_create_key_file,
    seal,
)
from infenclave.enclave.onnx_runner import NotData, check_model_is_data
from infenclave.errors import PolicyError, UsageError, VerificationError
from infenclave.protocol.bundle_format import (
    MANIFEST_FILE,
    PART_FILES,
    SIGNATURE_FILE,
    decrypt_part,
    part_aad,
)
from infenclave.protocol.frames import MsgType
from infenclave.protocol.messages import provision_context
from test_client import Requests
from test_enclave_program import Enclave
from test_serving_support import ServerProcess, loaded_model, make_bundle, sim_client

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def owner():
    return make_bundle(MODEL)


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory):
    """The host's own bundle of the same public model: FrontNet = the stem only, so IR1 is
    nearly the image (answers stay correct), with the host's own model and owner keys."""
    out = tmp_path_factory.mktemp("host") / "evil.bundle"
    result = partition(loaded_model(MODEL), "_conv_stem", "_conv_head", out)
    return result


@pytest.fixture(scope="module")
def owner_server(owner):
    proc = ServerProcess(owner.bundle, workers=1)
    client = sim_client(proc.url, owner.policy)
    client.provision(owner.key)
    client.close()
    yield proc
    proc.stop()


def test_host_serving_its_own_bundle_is_refused_before_the_image_is_sent(owner, host_bundle, photos) -> None:
    server = ServerProcess(host_bundle.bundle_dir, workers=1)
    try:
        host = sim_client(server.url, host_bundle.policy_file)
        host.provision(host_bundle.key_file)  # the host provisions its own key: stock commands
        host.close()
        requests = Requests()
        victim = sim_client(server.url, owner.policy, http=requests.http())  # the OWNER's policy
        with pytest.raises(VerificationError, match="does not name"):
            victim.classify(photos["chelsea"].read_bytes())
        # Evidence and the public manifest were fetched; no image, no key, ever.
        assert set(requests.seen) <= {("GET", "/v1/attestation"), ("GET", "/v1/model")}
        # A policy that trusts only the owner's signing key refuses it as well.
        doc = json.loads(owner.policy.read_text())
        doc["model_ids"] = []
        signers_only = owner.policy.with_name("signers-only.json")
        signers_only.write_text(json.dumps(doc))
        with pytest.raises(VerificationError, match="owner key the policy does not list"):
            sim_client(server.url, signers_only, http=requests.http()).classify(photos["chelsea"].read_bytes())
        assert ("POST", "/v1/classify") not in requests.seen
    finally:
        server.stop()


def test_a_policy_that_names_no_model_is_refused(owner, tmp_path) -> None:
    doc = json.loads(owner.policy.read_text())
    doc["model_ids"], doc["model_signers"] = [], []
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match="names no model"):
        sim_client("http://127.0.0.1:9", tmp_path / "p.json")


def test_a_signed_release_accepted_by_owner_key_alone(owner_server, owner, photos, tmp_path) -> None:
    doc = json.loads(owner.policy.read_text())
    doc["model_ids"] = []  # "any release this owner signed"
    (tmp_path / "p.json").write_text(json.dumps(doc))
    client = sim_client(owner_server.url, tmp_path / "p.json")
    assert client.classify(photos["coffee"].read_bytes(), k=1)[0].label.startswith("espresso")


def test_answer_sizes_do_not_depend_on_the_label(owner_server, owner, photos) -> None:
    sizes: dict[int, set[int]] = {1: set(), 5: set()}
    labels = set()
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        for k in sizes:
            requests = []
            http = httpx.Client(timeout=60, event_hooks={"response": [requests.append]})
            client = sim_client(owner_server.url, owner.policy, http=http)
            top = client.classify(photos[name].read_bytes(), k=k)
            labels.add(top[0].label)
            classify = [r for r in requests if r.request.url.path == "/v1/classify"]
            sizes[k].add(int(classify[-1].headers["content-length"]))
    assert len(labels) == 4  # four different answers...
    assert all(len(s) == 1 for s in sizes.values()), sizes  # ...one size per k


def test_second_provisioning_with_another_key_is_refused_clearly(owner_server, owner, host_bundle, tmp_path) -> None:
    from infenclave.bundle import ModelKey, write_key_file

    client = sim_client(owner_server.url, owner.policy)
    assert client.provision(owner.key) == 1  # the same key again: harmless
    other = tmp_path / "other.key"
    write_key_file(other, ModelKey(owner.model_id, os.urandom(32)))
    with pytest.raises(UsageError, match="different model key"):
        client.provision(other)


def test_sim_signers_pin_the_simulation_key(owner_server, owner, tmp_path) -> None:
    doc = json.loads(owner.policy.read_text())
    doc["sim_signers"] = ["ab" * 32]
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="sim"):
        sim_client(owner_server.url, tmp_path / "p.json").attest()
    doc["sim_signers"] = None
    (tmp_path / "q.json").write_text(json.dumps(doc))
    with pytest.warns(SimulationWarning, match="ANY key"):
        Client(owner_server.url, tmp_path / "q.json", allow_simulation=True)


def test_edited_signed_manifest_is_refused_by_the_enclave(owner, tmp_path) -> None:
    bundle = tmp_path / owner.bundle.name
    shutil.copytree(owner.bundle, bundle)
    raw = (bundle / MANIFEST_FILE).read_bytes()
    (bundle / MANIFEST_FILE).write_bytes(raw.replace(b'"efficientnet-lite0"', b'"efficientnet-lite9"'))
    enclave = Enclave(bundle, tmp_path / "state")
    try:
        refused = enclave.call(MsgType.LOAD, {"bundle": bundle.name})
        assert refused.type == MsgType.ERROR and refused.meta["error"] == "bad_bundle"
    finally:
        log = enclave.stderr()
    assert "signature over the manifest does not verify" in log


def _with_external_frontnet(result, tmp_path: Path) -> Path:
    """The host's own bundle, its FrontNet's first initializer moved to 'external data'
    naming a file in the enclave's working directory (the sim sealing key's name)."""
    bundle = tmp_path / result.bundle_dir.name
    shutil.copytree(result.bundle_dir, bundle)
    manifest = read_manifest(bundle)
    key = read_key_file(result.key_file).key
    front = onnx.load_model_from_string(
        decrypt_part(manifest, "frontnet", (bundle / PART_FILES["frontnet"]).read_bytes(), key)
    )
    tail = decrypt_part(manifest, "tail", (bundle / PART_FILES["tail"]).read_bytes(), key)
    external_data_helper.set_external_data(front.graph.initializer[0], location="sim-seal.key")
    front.graph.initializer[0].ClearField("raw_data")
    front_bytes = front.SerializeToString()
    doc = json.loads(manifest.raw)
    doc["parts"]["frontnet"].update(sha256=hashlib.sha256(front_bytes).hexdigest(), size=len(front_bytes))
    raw = json.dumps(doc, indent=2, sort_keys=True).encode()
    digest = hashlib.sha256(raw).digest()
    (bundle / MANIFEST_FILE).write_bytes(raw)
    owner_key = load_or_create_key_file(owner_key_path_for(result.bundle_dir), ED25519_KEY_SIZE)
    (bundle / SIGNATURE_FILE).write_bytes(ed25519_sign(owner_key, raw))
    (bundle / PART_FILES["frontnet"]).write_bytes(aead_encrypt(key, front_bytes, part_aad(digest, "frontnet")))
    (bundle / PART_FILES["tail"]).write_bytes(aead_encrypt(key, tail, part_aad(digest, "tail")))
    return bundle


def test_onnx_external_data_is_refused_before_loading(host_bundle, tmp_path) -> None:
    bundle = _with_external_frontnet(host_bundle, tmp_path)
    manifest = read_manifest(bundle)
    enclave = Enclave(bundle, tmp_path / "state")
    try:
        loaded = enclave.call(MsgType.LOAD, {"bundle": bundle.name})
        assert loaded.type == MsgType.LOADED
        key = read_key_file(host_bundle.key_file).key
        sealed = seal(enclave.public_key, key, context=provision_context(manifest.model_id))
        refused = enclave.call(MsgType.PROVISION, body=sealed)
        assert refused.type == MsgType.ERROR and refused.meta["error"] == "refused"
    finally:
        log = enclave.stderr()
    assert "graphs do not load (NotData)" in log


def test_onnx_functions_and_foreign_operators_are_refused() -> None:
    from onnx import helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    check_model_is_data(helper.make_model(graph).SerializeToString())  # plain data passes
    custom = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "g", graph.input, graph.output
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    with pytest.raises(NotData, match="domain"):
        check_model_is_data(custom.SerializeToString())
    function = helper.make_function(
        "local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", 17)]
    )
    with_function = helper.make_model(
        graph, functions=[function], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    )
    with pytest.raises(NotData):
        check_model_is_data(with_function.SerializeToString())


def test_partition_warns_that_a_public_tail_protects_no_label(tmp_path) -> None:
    from conftest import run_cli

    with warnings.catch_warnings():
        done = run_cli(
            "partition", MODEL, "--front-end", "_blocks.3", "--tail-start", "_conv_head", "--out", str(tmp_path / "b")
        )
    assert done.returncode == 0, done.stderr
    assert "weights are public" in done.stderr and "--tail-start" in done.stderr


@pytest.mark.parametrize(
    "field, value",
    [
        ("resize", 100_000),
        ("crop", 10_000),
        ("std", [0.0, 1.0, 1.0]),
        ("mean", [float("nan"), 0.0, 0.0]),
        ("layout", "NCWH"),
    ],
)
def test_hostile_preprocess_values_in_a_manifest_are_refused(field, value) -> None:
    from infenclave.enclave.imaging import Preprocess
    from infenclave.errors import ModelError

    doc = {
        "resize": 256,
        "crop": 224,
        "mean": [127.0] * 3,
        "std": [128.0] * 3,
        "channel_order": "RGB",
        "layout": "NCHW",
        field: value,
    }
    with pytest.raises(ModelError, match="preprocess"):
        Preprocess.from_dict(doc)


def test_only_ir2_frames_may_be_large() -> None:
    import struct

    from infenclave.errors import EnclaveError
    from infenclave.protocol.frames import HEADER, MAGIC, MAX_BODY_BYTES, MAX_OTHER_BODY_BYTES, decode_header

    def header(msg: MsgType, body: int) -> bytes:
        return struct.pack(HEADER.format, MAGIC, int(msg), 0, 0, 1, 0, body)

    assert decode_header(header(MsgType.IR2, MAX_BODY_BYTES))[3] == MAX_BODY_BYTES
    assert decode_header(header(MsgType.REQUEST, MAX_OTHER_BODY_BYTES))[3] == MAX_OTHER_BODY_BYTES
    for msg in (MsgType.REQUEST, MsgType.PROVISION, MsgType.UNSEAL, MsgType.LOAD):
        with pytest.raises(EnclaveError, match="larger than the limits"):
            decode_header(header(msg, MAX_OTHER_BODY_BYTES + 1))
