"""The whole model in the enclave: a bundle with an empty BackNet, served end to end.

When no cut point is safe the plan recommends keeping every layer in the enclave. These tests
run that deployment for real: a real whole-model bundle of Lite0, a real enclave process
driven frame by frame over a socketpair (the test plays the host and records every frame the
enclave sends: no IR1 among them, and an IR2 it is handed is refused), a real
`infenclave serve` with real workers and client (top-5 equal to `predict`, zero BackNet
batches in /metrics, no IR frame on the host's own channel tap), and a manifest whose
deployment mode was flipped (refused).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest

from infenclave.bundle import partition, read_key_file
from infenclave.crypto import open_sealed, seal
from infenclave.errors import BundleError, ExitCode, NotEnoughEvidence, UnsafeVerdict, exit_code_for
from infenclave.protocol.bundle_format import (
    DEPLOY_WHOLE_MODEL,
    MANIFEST_FILE,
    PART_FILES,
    SIGNATURE_FILE,
    parse_manifest,
)
from infenclave.protocol.frames import HEADER, MsgType, decode_header, encode_frame, write_frame
from infenclave.protocol.messages import provision_context, response_context
from test_enclave_program import Enclave, _request
from test_serving_support import (
    ServerProcess,
    assert_same_top5,
    loaded_model,
    make_bundle,
    plain_predictor,
    sim_client,
)

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "lite0-whole"
    return partition(loaded_model(MODEL), None, None, out, whole_model=True)


def test_whole_model_bundle_has_one_encrypted_part_and_no_backnet(whole) -> None:
    assert sorted(p.name for p in whole.bundle_dir.iterdir()) == sorted(
        [MANIFEST_FILE, SIGNATURE_FILE, PART_FILES["model"]]
    )
    manifest = parse_manifest((whole.bundle_dir / MANIFEST_FILE).read_bytes())
    doc = json.loads(manifest.raw)
    assert doc["deployment"] == DEPLOY_WHOLE_MODEL and manifest.whole_model
    assert doc["cuts"] is None and doc["backnet"] is None and set(doc["parts"]) == {"model"}
    assert doc["parts"]["model"]["encrypted"] is True
    assert manifest.front_end is None and manifest.tail_start is None and manifest.backnet is None
    # The cost the partition reports: every FLOP and every parameter in the enclave.
    cost = whole.cost
    assert cost["enclave_flops"] == cost["total_flops"] > 3e8  # Lite0: ~0.4 GFLOPs per image
    assert cost["enclave_param_bytes"] == cost["total_param_bytes"] > 10 * 2**20
    assert _manifest_doc(make_bundle(MODEL).bundle)["deployment"] == "partitioned"


def _manifest_doc(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_FILE).read_bytes())


def _raw(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def test_inconsistent_manifests_are_refused(whole) -> None:
    whole_doc = _manifest_doc(whole.bundle_dir)
    split_doc = _manifest_doc(make_bundle(MODEL).bundle)
    cases = {
        "whole, but a BackNet part": dict(
            whole_doc, parts={**whole_doc["parts"], "backnet": split_doc["parts"]["backnet"]}
        ),
        "whole, but a BackNet section": dict(whole_doc, backnet=split_doc["backnet"]),
        "whole, but cuts": dict(whole_doc, cuts=split_doc["cuts"]),
        "whole, but split parts": dict(whole_doc, parts=split_doc["parts"]),
        "split, but the whole-model part": dict(
            split_doc, parts={**split_doc["parts"], "model": whole_doc["parts"]["model"]}
        ),
        "split, without cuts": dict(split_doc, cuts=None),
        "split, without a BackNet section": dict(split_doc, backnet=None),
        "split relabelled whole": dict(split_doc, deployment=DEPLOY_WHOLE_MODEL),
        "whole relabelled split": dict(whole_doc, deployment="partitioned"),
        "no deployment": {k: v for k, v in whole_doc.items() if k != "deployment"},
        "unknown deployment": dict(whole_doc, deployment="host-only"),
    }
    for name, doc in cases.items():
        with pytest.raises(BundleError):
            parse_manifest(_raw(doc))
            pytest.fail(name)


def _frames_sent(enclave: Enclave, msg: MsgType, meta: dict | None = None, body: bytes = b"", tag: int | None = None):
    """Send one frame; return every frame the enclave sends until the one that answers it."""
    enclave._tag += 1
    tag = tag if tag is not None else enclave._tag
    write_frame(enclave.sock.fileno(), encode_frame(msg, tag, meta, body))
    sent = []
    while True:
        frame = enclave.reader.read()
        assert frame is not None, enclave.stderr()
        sent.append(frame)
        if frame.tag == tag:
            return sent


def test_enclave_runs_the_whole_model_and_no_ir_frame_leaves_it(whole, photos, tmp_path) -> None:
    enclave = Enclave(whole.bundle_dir, tmp_path / "state")
    try:
        sent = _frames_sent(enclave, MsgType.LOAD, {"bundle": whole.bundle_dir.name})
        key = read_key_file(whole.key_file)
        sealed_key = seal(enclave.public_key, key.key, context=provision_context(key.model_id))
        sent += _frames_sent(enclave, MsgType.PROVISION, body=sealed_key)
        assert [f.type for f in sent] == [MsgType.LOADED, MsgType.PROVISIONED], enclave.stderr()
        predictor = plain_predictor(MODEL)
        tags = []
        for name in ("coffee", "flower"):
            data = photos[name].read_bytes()
            request_id, reply_private, body = _request(enclave, whole.model_id, data)
            frames = _frames_sent(enclave, MsgType.REQUEST, {"request_id": request_id}, body)
            sent += frames
            # A whole classification is one frame out: the sealed RESULT. No IR1.
            assert [f.type for f in frames] == [MsgType.RESULT], enclave.stderr()
            assert set(frames[0].meta["t"]) == {"open_ms", "decode_ms", "model_ms", "seal_ms"}
            answer = open_sealed(
                reply_private, bytes(frames[0].body), context=response_context(whole.model_id, request_id)
            )
            predictions = json.loads(answer)["predictions"]
            plain = predictor.predict(data, 5)
            assert [p["index"] for p in predictions] == [p.index for p in plain]
            np.testing.assert_allclose([p["prob"] for p in predictions], [p.prob for p in plain], atol=1e-4)
            tags.append(frames[0].tag)
        # The host injects IR2 frames: for a request already answered, and for a fresh tag.
        ir2 = np.zeros((1, 320, 7, 7), dtype=np.float32)
        meta = {"dtype": "float32", "shape": list(ir2.shape)}
        for tag in (tags[0], 999):
            refused = _frames_sent(enclave, MsgType.IR2, meta, ir2.tobytes(), tag=tag)
            assert [(f.type, f.meta.get("error")) for f in refused] == [(MsgType.ERROR, "refused")]
            sent += refused
        # It keeps serving after the refusals, still without an IR frame.
        request_id, reply_private, body = _request(enclave, whole.model_id, photos["coffee"].read_bytes())
        sent += _frames_sent(enclave, MsgType.REQUEST, {"request_id": request_id}, body)
        assert sent[-1].type == MsgType.RESULT
        assert not {MsgType.IR1, MsgType.IR2} & {f.type for f in sent}
    finally:
        log = enclave.stderr()
    assert "ir2: the whole model runs here, no IR2 is taken" in log


def test_flipped_deployment_mode_is_refused_by_the_enclave(whole, tmp_path) -> None:
    """A host that edits the manifest's deployment (say, to take IR frames it could read)
    gets a manifest the enclave refuses: inconsistent, unsigned by the owner, another id."""
    doc = _manifest_doc(whole.bundle_dir)
    tampered = tmp_path / "bundles" / "tampered"
    shutil.copytree(whole.bundle_dir, tampered)
    for deployment, extra in (
        ("partitioned", {}),  # structurally inconsistent
        ("partitioned", {"cuts": _manifest_doc(make_bundle(MODEL).bundle)["cuts"]}),  # still no BackNet
    ):
        (tampered / MANIFEST_FILE).write_bytes(_raw({**doc, **extra, "deployment": deployment}))
        enclave = Enclave(tampered, tmp_path / "state")
        try:
            answer = enclave.call(MsgType.LOAD, {"bundle": tampered.name})
            assert (answer.type, answer.meta.get("error")) == (MsgType.ERROR, "bad_bundle")
        finally:
            enclave.close()
    # The deployment is in the bytes the model id hashes: any flip is another model id.
    assert parse_manifest(_raw(doc)).model_id == whole.model_id


def test_serving_a_whole_model_bundle_end_to_end(whole, photos, tmp_path) -> None:
    tap = tmp_path / "tap"
    server = ServerProcess(whole.bundle_dir, workers=2, tap_dir=tap)
    try:
        health = httpx.get(server.url + "/healthz").json()
        assert health["deployment"] == DEPLOY_WHOLE_MODEL and health["backnet"] is None
        ready = httpx.get(server.url + "/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["deployment"] == DEPLOY_WHOLE_MODEL
        model = httpx.get(server.url + "/v1/model").json()
        assert model["deployment"] == DEPLOY_WHOLE_MODEL and model["front_end"] is None
        client = sim_client(server.url, whole.policy_file)
        client.attest()
        assert client.provision(whole.key_file) == 2
        predictor = plain_predictor(MODEL)
        for path in photos.values():
            assert_same_top5(client.classify(path.read_bytes(), k=5), predictor.predict(path.read_bytes(), 5))
        client.close()
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
        text = httpx.get(server.url + "/metrics").text
        assert f'deployment="{DEPLOY_WHOLE_MODEL}"' in text
        assert "infenclave_backnet_batch_size_count 0" in text  # zero BackNet calls
        assert 'stage="backnet' not in text and 'stage="model"' in text
        assert f'infenclave_requests_total{{endpoint="classify",outcome="ok",code="200"}} {len(photos)}' in text
        assert "the whole model in the enclave (no BackNet)" in server.log()
    finally:
        server.stop()
    # Every frame on the host's side of every enclave channel: none carries an IR.
    types = []
    for recording in tap.iterdir():
        data = recording.read_bytes()
        pos = 0
        while pos < len(data):
            _, length = struct.unpack(">BI", data[pos : pos + 5])
            types.append(decode_header(data[pos + 5 : pos + 5 + HEADER.size])[0])
            pos += 5 + length
    assert types.count(MsgType.RESULT) == len(photos) and types.count(MsgType.REQUEST) == len(photos)
    assert MsgType.IR1 not in types and MsgType.IR2 not in types


def test_partition_cli_whole_model_and_its_refusals(tmp_path) -> None:
    from conftest import run_cli

    out = run_cli("partition", MODEL, "--whole-model", "--out", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    assert "whole-model-in-enclave" in out.stdout and "no BackNet" in out.stdout
    assert "(100%)" in out.stdout and "MFLOPs" in out.stdout
    assert "warning" not in out.stderr  # no IR2: the public Tail warning does not apply
    both = run_cli("partition", MODEL, "--whole-model", "--front-end", "_blocks.3", "--out", str(tmp_path / "x"))
    assert both.returncode == ExitCode.USAGE and "--whole-model takes no" in both.stderr
    assert not (tmp_path / "x").exists()


def test_no_safe_cut_and_not_enough_evidence_have_their_own_exit_codes() -> None:
    assert exit_code_for(UnsafeVerdict("no-safe-cut")) == ExitCode.UNSAFE == 4
    assert exit_code_for(NotEnoughEvidence("not-enough-evidence")) == ExitCode.NOT_ENOUGH_EVIDENCE == 6


def test_report_states_the_cost_of_the_whole_model(tmp_path, photos) -> None:
    """A real plan (the KL method on one photo), turned into what `build_plan` writes when the
    attacks then reject every cut: the report states the whole model's enclave cost, against
    the split at the KL method's first safe cut."""
    from infenclave.assess import AssessOptions, run_assess
    from infenclave.assess.plan import DEPLOY_WHOLE_MODEL as PLAN_WHOLE
    from infenclave.assess.plan import validate_plan
    from infenclave.assess.report import ReportInputs, render_report

    run_assess(AssessOptions(model=MODEL, images=[photos["flower"]], out=tmp_path / "a", adversary="passive"))
    doc = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert doc["partition"] is not None  # the KL method alone found a safe cut
    cuts = {c["name"]: c for c in doc["cuts"]}
    first_safe, tail_start = doc["recommendation"]["front_end"], doc["recommendation"]["tail_start"]
    split_flops = doc["partition"]["frontnet"]["cost"]["flops"] + doc["partition"]["tail"]["cost"]["flops"]
    whole = {
        k: sum(doc["partition"][p]["cost"][k] for p in ("frontnet", "backnet", "tail"))
        for k in ("flops", "param_bytes")
    }
    whole_cost = dict(doc["partition"]["backnet"]["cost"], **whole)  # peak and memory: any valid figures
    doc["recommendation"].update(front_end=None, verdict="no-safe-cut", deployment=PLAN_WHOLE)
    doc["partition"] = None
    doc["enclave"] = dict(doc["enclave"], deployment=PLAN_WHOLE, cost=whole_cost, flops_share_in_enclave=1.0)
    validate_plan(doc)
    html = render_report(ReportInputs(plan=doc, result=None))
    section = html.split('id="whole-model"', 1)[1].split("<h2", 1)[0]
    assert "100% of the model's FLOPs run in the enclave" in section and "no IR1 or IR2 leaves" in section
    assert f"<code>{first_safe}</code>" in section and f"<code>{tail_start}</code>" in section
    assert f"{whole['flops'] / split_flops:.2f}&times;" in section
    assert cuts[first_safe]["frontnet_cost"]["flops"] < split_flops < whole["flops"]
    assert "partition MODEL --plan plan.json" in section
