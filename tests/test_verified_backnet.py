"""Verified BackNet: the test plays the (active, malicious) host against real enclave processes.

Real `python -m infenclave.enclave` workers over real socketpairs, a real Lite0 bundle and the
real BackNet on ONNX Runtime. Forged IR2s (zeros, a channel permutation, noise, an edited
element, one channel replaced by N(0, 1) noise, another live request's tensors) are each
refused, the worker then refuses everything, and honest requests before that pass with the
top-5 of `infenclave predict`.
A coverage test compiles the widest BackNet of every zoo model and of a plain-torch ResNet-50.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from infenclave.bundle import read_backnet, read_manifest
from infenclave.crypto import open_sealed
from infenclave.errors import BundleError
from infenclave.protocol.backnet_verify import VERIFY_FILE, parse_verify_file
from infenclave.protocol.frames import MsgType, tensor_from_frame, tensors_meta
from infenclave.protocol.messages import response_context
from test_enclave_program import Enclave, _ready, _request
from test_serving_support import make_bundle, plain_predictor

MODEL = "efficientnet-lite0"
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def bundle():
    return make_bundle(MODEL)


@pytest.fixture(scope="module")
def backnet(bundle):
    from infenclave.host.backnet import BackNet

    return BackNet(read_backnet(bundle.bundle, read_manifest(bundle.bundle)), threads=1)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("verified-state")


def _send(enclave: Enclave, tag: int, outputs: list[np.ndarray]):
    outputs = [np.ascontiguousarray(y, dtype=np.float32) for y in outputs]
    return enclave.call(MsgType.IR2, tensors_meta(outputs), b"".join(memoryview(y).cast("B") for y in outputs), tag=tag)


def _start(enclave: Enclave, bundle, image: bytes):
    request_id, reply_private, sealed = _request(enclave, bundle.model_id, image)
    ir1 = enclave.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert ir1.type == MsgType.IR1
    return ir1.tag, tensor_from_frame(ir1).copy(), request_id, reply_private


def _predictions(bundle, frame, request_id: str, reply_private) -> list[dict]:
    assert frame.type == MsgType.RESULT
    answer = open_sealed(reply_private, bytes(frame.body), context=response_context(bundle.model_id, request_id))
    return json.loads(answer)["predictions"]


def _assert_dead(enclave: Enclave, bundle, backnet, image: bytes) -> None:
    """After a failed check the worker refuses an honest request."""
    request_id, _, sealed = _request(enclave, bundle.model_id, image)
    refused = enclave.call(MsgType.REQUEST, {"request_id": request_id}, sealed)
    assert refused.type == MsgType.ERROR and refused.meta["error"] == "backnet_check_failed"


def _forge_zeros(outs, other):
    return [np.zeros_like(y) for y in outs]


def _forge_permutation(outs, other):
    rng = np.random.default_rng(1)  # every tensor's channels shuffled consistently with itself
    return [y[:, rng.permutation(y.shape[1])] for y in outs]


def _forge_noise(outs, other):
    rng = np.random.default_rng(2)
    return [y + rng.normal(0, 0.05, y.shape).astype(np.float32) for y in outs]


def _forge_edit(outs, other):
    edited = [y.copy() for y in outs]
    edited[len(edited) // 2].flat[123] += 100.0  # one element of a middle intermediate
    return edited


def _forge_channel(outs, other):
    rng = np.random.default_rng(3)  # one channel of a middle intermediate replaced by N(0, 1) noise
    edited = [y.copy() for y in outs]
    y = edited[len(edited) // 2]
    y[:, y.shape[1] // 3] = rng.normal(0, 1, y[:, 0].shape).astype(np.float32)
    return edited


def _forge_swap(outs, other):
    return other  # the other live request's honest tensors


@pytest.mark.parametrize(
    "forge", [_forge_zeros, _forge_permutation, _forge_noise, _forge_edit, _forge_channel, _forge_swap]
)
def test_forged_backnet_output_is_refused_then_everything(forge, bundle, backnet, state, photos) -> None:
    enclave = _ready(bundle, state)
    try:
        coffee, rocket = photos["coffee"].read_bytes(), photos["rocket"].read_bytes()
        # An honest request first: it passes, with the plain model's top-5.
        tag, ir1, rid, priv = _start(enclave, bundle, coffee)
        got = _predictions(bundle, _send(enclave, tag, backnet(ir1)), rid, priv)
        assert [p["index"] for p in got] == [p.index for p in plain_predictor(MODEL).predict(coffee, 5)]
        # Two live requests: the victim's and the host's own; the host forges the first answer.
        tag_a, ir1_a, _, _ = _start(enclave, bundle, coffee)
        tag_b, ir1_b, rid_b, priv_b = _start(enclave, bundle, rocket)
        outs_a, outs_b = backnet(ir1_a), backnet(ir1_b)
        refused = _send(enclave, tag_a, forge(outs_a, outs_b))
        assert refused.type == MsgType.ERROR and refused.meta["error"] == "backnet_check_failed"
        # The worker now refuses everything: an honest IR2 for a live request, a new request.
        late = _send(enclave, tag_b, outs_b)
        assert late.type == MsgType.ERROR and late.meta["error"] == "backnet_check_failed"
        _assert_dead(enclave, bundle, backnet, coffee)
    finally:
        log = enclave.stderr()
    assert "BackNet check failed at op" in log


def test_host_answers_its_own_request_with_the_victims_ir2(bundle, backnet, state, photos) -> None:
    enclave = _ready(bundle, state)
    try:
        victim_tag, victim_ir1, _, _ = _start(enclave, bundle, photos["rocket"].read_bytes())
        own_tag, own_ir1, _, _ = _start(enclave, bundle, photos["coffee"].read_bytes())
        stolen = _send(enclave, own_tag, backnet(victim_ir1))  # to learn the victim's label
        assert stolen.type == MsgType.ERROR and stolen.meta["error"] == "backnet_check_failed"
    finally:
        enclave.stderr()


def test_honest_requests_match_plain_top5(bundle, backnet, state, photos) -> None:
    enclave = _ready(bundle, state)
    try:
        for name in ("chelsea", "coffee", "astronaut", "rocket"):
            image = photos[name].read_bytes()
            tag, ir1, rid, priv = _start(enclave, bundle, image)
            got = _predictions(bundle, _send(enclave, tag, backnet(ir1)), rid, priv)
            plain = plain_predictor(MODEL).predict(image, 5)
            assert [p["index"] for p in got] == [p.index for p in plain]
            np.testing.assert_allclose([p["prob"] for p in got], [p.prob for p in plain], atol=1e-4)
    finally:
        enclave.stderr()


def test_verify_file_is_covered_by_the_model_id_and_parsed_strictly(bundle) -> None:
    manifest = read_manifest(bundle.bundle)
    assert manifest.backnet.verified and manifest.backnet.max_failures == 1
    raw = (bundle.bundle / VERIFY_FILE).read_bytes()
    assert manifest.backnet.size == len(raw)
    spec = parse_verify_file(raw)
    assert spec.input_shape == (1, *manifest.front_end.shape)
    for broken in (raw[:-4], b"X" + raw[1:], raw[:20]):
        with pytest.raises(BundleError):
            parse_verify_file(broken)


def _widest_backnet_ops(model) -> None:
    from infenclave.network import analyse
    from infenclave.split import ternary_split
    from infenclave.verify_build import build_verification

    net = analyse(model)
    # Every BackNet of any cut pair is a subgraph of the one from the first to the last cut.
    split = ternary_split(net, net.cuts[0].name, net.cuts[-1].name)
    raw, _ = build_verification(split.back, split.front_end.shape)
    spec = parse_verify_file(raw)
    assert spec.ops and spec.output == len(spec.ops)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_zoo_backnets_are_fully_covered(name) -> None:
    from infenclave.models import load_model

    _widest_backnet_ops(load_model(name))


def test_plain_torch_resnet50_backnet_is_fully_covered(tmp_path) -> None:
    from infenclave.models import load_model

    (tmp_path / "resnet50_plain.py").write_text((ASSETS / "resnet50_plain.py").read_text())
    (tmp_path / "labels.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    (tmp_path / "r50.yaml").write_text(
        "name: resnet50-plain\ntorch: resnet50_plain:build\npreprocess:\n  resize: [224, 224]\n"
        "  mean: [123.675, 116.28, 103.53]\n  std: [58.395, 57.12, 57.375]\nlabels: labels.txt\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        _widest_backnet_ops(load_model(str(tmp_path / "r50.yaml")))
    finally:
        sys.path.remove(str(tmp_path))


def test_dense_strided_grouped_and_gemm_checks_accept_honest_and_refuse_edits() -> None:
    """The paths Lite0 does not take: a dense 3x3 conv with stride and pads, a grouped conv with
    dilation, global average pool and Gemm (in-process: the verifier against ONNX Runtime)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from infenclave.enclave.verify import BackNetVerifier, CheckFailed
    from infenclave.verify_build import build_verification

    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
        for name, shape in [("w1", (6, 4, 3, 3)), ("b1", (6,)), ("w2", (6, 3, 3, 3)), ("w3", (5, 6)), ("b3", (5,))]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=2, pads=[1, 0, 1, 0], dilations=[1, 2]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    raw, back = build_verification(model, (4, 9, 9))
    spec = parse_verify_file(raw)
    assert [op.op for op in spec.ops] == ["conv", "clip", "conv", "gap", "reshape", "linear"]
    session = ort.InferenceSession(back.SerializeToString(), providers=["CPUExecutionProvider"])
    verifier = BackNetVerifier(spec)
    for _ in range(20):
        x = rng.normal(0, 1, (1, 4, 9, 9)).astype(np.float32)
        outs = session.run(None, {"x": x})
        verifier.check(x, outs[0], outs[1:])
    assert verifier.last_margin < 0.5
    for t in range(len(outs)):  # one element of any tensor, edited by far less than its scale
        edited = [y.copy() for y in outs]
        edited[t].flat[int(rng.integers(edited[t].size))] += 0.05
        with pytest.raises(CheckFailed):
            verifier.check(x, edited[0], edited[1:])
