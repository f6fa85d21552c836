"""`infenclave partition`: the bundle, the owner's key file (0600), the starter policy, and
tamper detection; the `sim` measurement that the policy pins."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infenclave.bundle import (
    key_path_for,
    owner_key_path_for,
    policy_path_for,
    read_backnet,
    read_key_file,
    read_manifest,
    read_plan,
    sim_measurement,
)
from infenclave.crypto import ed25519_verify
from infenclave.errors import BundleError, UsageError
from infenclave.protocol.backnet_verify import VERIFY_FILE
from infenclave.protocol.bundle_format import (
    MANIFEST_FILE,
    PART_FILES,
    SIGNATURE_FILE,
    decode_tail,
    decrypt_part,
    parse_manifest,
)
from test_serving_support import make_bundle

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def assessed_plan(tmp_path_factory, photos) -> Path:
    """A real plan: the KL method alone on one photo (about 10 s)."""
    from infenclave.assess import AssessOptions, run_assess

    out = tmp_path_factory.mktemp("plan") / "a"
    run_assess(AssessOptions(model="efficientnet-lite0", images=[photos["flower"]], out=out, adversary="passive"))
    return out / "plan.json"


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, assessed_plan: Path) -> Path:
    """A bundle written by the real command line, as a user runs it, from a real plan."""
    out = tmp_path_factory.mktemp("cli") / "lite0"
    plan = out.parent / "plan.json"
    doc = json.loads(assessed_plan.read_text())
    # The serving tests' cut, wherever the one-photo assessment put it.
    doc["recommendation"].update(front_end="_blocks.3", tail_start="_conv_head")
    doc["partition"]["frontnet"]["end"] = doc["partition"]["backnet"]["start"] = "_blocks.3"
    doc["partition"]["tail"]["start"] = doc["partition"]["backnet"]["end"] = "_conv_head"
    plan.write_text(json.dumps(doc))
    result = subprocess.run(
        [sys.executable, "-m", "infenclave.cli", "partition", MODEL, "--plan", str(plan), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "model id" in result.stdout
    return out


def test_partition_writes_bundle_key_0600_and_starter_policy(cli_bundle: Path) -> None:
    assert sorted(p.name for p in cli_bundle.iterdir()) == sorted(
        [MANIFEST_FILE, SIGNATURE_FILE, VERIFY_FILE, *(PART_FILES[p] for p in ("frontnet", "backnet", "tail"))]
    )
    key_file = key_path_for(cli_bundle)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    owner_key = owner_key_path_for(cli_bundle)
    assert stat.S_IMODE(owner_key.stat().st_mode) == 0o600
    assert not any(p.name.endswith(".key") for p in cli_bundle.iterdir())  # never inside the bundle
    manifest = read_manifest(cli_bundle)
    key = read_key_file(key_file)
    assert key.model_id == manifest.model_id and len(key.key) == 32
    assert "key=<redacted>" in repr(key)
    policy = json.loads(policy_path_for(cli_bundle).read_text())
    assert policy["allow_simulation"] is False
    assert policy["measurements"]["sim"] == [sim_measurement().hex()]
    # The policy names the model twice: this release, and the owner key that signed it.
    assert policy["model_ids"] == [manifest.model_id]
    assert manifest.owner_key is not None and policy["model_signers"] == [manifest.owner_key.hex()]
    ed25519_verify(manifest.owner_key, (cli_bundle / SIGNATURE_FILE).read_bytes(), manifest.raw)
    assert (manifest.front_end.name, manifest.tail_start.name) == ("_blocks.3", "_conv_head")


def test_manifest_has_hashes_but_no_label_names(cli_bundle: Path) -> None:
    from infenclave.models.zoo import imagenet_labels

    raw = (cli_bundle / MANIFEST_FILE).read_bytes()
    manifest = parse_manifest(raw)
    assert manifest.num_classes == 1000
    assert set(manifest.parts) == {"frontnet", "backnet", "tail"}
    for label in imagenet_labels():
        if len(label) >= 6:
            assert label.encode() not in raw
    # The labels travel in the encrypted Tail, in order.
    key = read_key_file(key_path_for(cli_bundle)).key
    tail = decrypt_part(manifest, "tail", (cli_bundle / PART_FILES["tail"]).read_bytes(), key)
    assert decode_tail(tail, 1000)[1] == imagenet_labels()
    assert read_backnet(cli_bundle, manifest)  # the clear part matches its hash


def test_partition_refuses_to_overwrite(cli_bundle: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "infenclave.cli",
            "partition",
            MODEL,
            "--front-end",
            "_blocks.3",
            "--tail-start",
            "_conv_head",
            "--out",
            str(cli_bundle),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--force" in result.stderr


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    paths = make_bundle(MODEL)
    out = tmp_path / paths.bundle.name
    shutil.copytree(paths.bundle, out)
    shutil.copy2(paths.key, key_path_for(out))
    return out


def _decrypt_all(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    key = read_key_file(key_path_for(bundle)).key
    for part in ("frontnet", "tail"):
        decrypt_part(manifest, part, (bundle / PART_FILES[part]).read_bytes(), key)
    read_backnet(bundle, manifest)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_untampered_copy_opens(copy: Path) -> None:
    _decrypt_all(copy)


@pytest.mark.parametrize("part", ["frontnet", "tail", "backnet"])
def test_a_flipped_bit_in_any_part_is_refused(copy: Path, part: str) -> None:
    _flip(copy / PART_FILES[part], len((copy / PART_FILES[part]).read_bytes()) // 2)
    with pytest.raises(BundleError):
        _decrypt_all(copy)


def test_an_edited_manifest_is_refused(copy: Path) -> None:
    path = copy / MANIFEST_FILE
    # A change that keeps the manifest valid JSON: the model id (its hash) changes, and the
    # encrypted parts, bound to the old hash, no longer open.
    path.write_bytes(path.read_bytes().replace(b'"num_classes": 1000', b'"num_classes":  1000'))
    with pytest.raises(BundleError, match="does not decrypt"):
        _decrypt_all(copy)


def test_swapped_parts_and_wrong_key_are_refused(copy: Path) -> None:
    manifest = read_manifest(copy)
    key = read_key_file(key_path_for(copy)).key
    front = (copy / PART_FILES["frontnet"]).read_bytes()
    with pytest.raises(BundleError):
        decrypt_part(manifest, "tail", front, key)  # the FrontNet blob presented as the Tail
    with pytest.raises(BundleError):
        decrypt_part(manifest, "frontnet", front, os.urandom(32))


def test_key_file_readable_by_others_is_refused(copy: Path) -> None:
    key_file = key_path_for(copy)
    key_file.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        read_key_file(key_file)


def test_read_plan_is_the_assessments_reader(assessed_plan: Path, tmp_path: Path) -> None:
    doc = json.loads(assessed_plan.read_text())
    chosen = (doc["partition"]["frontnet"]["end"], doc["partition"]["tail"]["start"])
    choice = read_plan(assessed_plan, doc["model"]["weights_sha256"])
    assert (choice.front_end, choice.tail_start) == chosen and not choice.whole_model
    with pytest.raises(UsageError, match="other weights"):
        read_plan(assessed_plan, "cd" * 32)
    # The schema is the assessment's: a lenient look-alike is not a plan.
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"front_end": "_blocks.3", "tail_start": "_conv_head"}))
    with pytest.raises(UsageError, match="not an infenclave assessment plan"):
        read_plan(plan)
    broken = dict(doc, partition={"frontnet": {}})
    plan.write_text(json.dumps(broken))
    with pytest.raises(UsageError, match="schema"):
        read_plan(plan)
    interrupted = json.loads(assessed_plan.read_text())
    interrupted["scan"]["partial"] = True
    plan.write_text(json.dumps(interrupted))
    with pytest.raises(UsageError):
        read_plan(plan)
