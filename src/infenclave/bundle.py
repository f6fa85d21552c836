"""Partition a model into a bundle: encrypted FrontNet and Tail, clear BackNet, a manifest.

Or, when no cut point is safe (``partition(..., whole_model=True)``), a whole-model bundle:
the whole network encrypted as one part, no BackNet, nothing for the host to run.

`partition` is what `infenclave partition` runs on the model owner's machine. It writes:

- ``BUNDLE/`` (the format is documented in `infenclave.protocol.bundle_format`): what the
  owner uploads to the untrusted host;
- ``BUNDLE.key`` beside it (mode 0600, never inside the bundle): the fresh 256-bit model key
  and the model id it belongs to, which the owner provisions to an attested enclave;
- ``BUNDLE.owner.key`` beside it (mode 0600, kept across releases when it exists): the
  owner's Ed25519 signing key. The manifest names its public half (``owner_key``) and
  ``BUNDLE/manifest.sig`` holds the signature over the manifest bytes;
- ``BUNDLE.policy.json`` beside it: a starter client policy that pins this release's model id,
  the owner's signing key and the enclave measurement, and refuses simulation
  (`starter_policy`).

The host reads only the manifest and the BackNet (`read_manifest`, `read_backnet`); the
enclave reads the encrypted parts itself (`infenclave.enclave.program`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infenclave.crypto import (
    AEAD_KEY_SIZE,
    ED25519_KEY_SIZE,
    aead_encrypt,
    ed25519_public_key,
    ed25519_sign,
    generate_aead_key,
    load_or_create_key_file,
)
from infenclave.errors import AssessmentError, BundleError, UsageError
from infenclave.protocol.backnet_verify import VERIFY_FILE, BackNetPolicy
from infenclave.protocol.bundle_format import (
    BUNDLE_FORMAT,
    DEPLOY_PARTITIONED,
    DEPLOY_WHOLE_MODEL,
    ENCRYPTED_PARTS,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_PART_BYTES,
    PART_FILES,
    SIGNATURE_BYTES,
    SIGNATURE_FILE,
    BundleManifest,
    check_part,
    encode_tail,
    model_id_of,
    parse_manifest,
    part_aad,
)

__all__ = [
    "KEY_FILE_FORMAT",
    "ModelKey",
    "PartitionResult",
    "PlanChoice",
    "default_state_dir",
    "key_path_for",
    "local_sim_signer",
    "owner_key_path_for",
    "partition",
    "policy_path_for",
    "read_backnet",
    "read_key_file",
    "read_manifest",
    "read_plan",
    "starter_policy",
    "write_key_file",
]

KEY_FILE_FORMAT = "infenclave-model-key/1"
#: Failed BackNet checks after which an enclave worker refuses everything until restarted:
#: one, so that accept/reject answers cannot be used to learn the secret projections.
DEFAULT_MAX_FAILURES = 1
_MAX_KEY_FILE_BYTES = 4096


@dataclass(frozen=True)
class ModelKey:
    """The owner's secret: the bundle's AES-256 key and the model id it belongs to."""

    model_id: str
    key: bytes

    def __repr__(self) -> str:  # never print the key by accident
        return f"ModelKey(model_id={self.model_id!r}, key=<redacted>)"


@dataclass(frozen=True)
class PartitionResult:
    """What `partition` wrote, for the CLI to report."""

    bundle_dir: Path
    key_file: Path
    policy_file: Path
    model_id: str
    front_end: str | None  # None for a whole-model bundle
    tail_start: str | None
    sim_measurement: str
    part_sizes: dict[str, int]
    deployment: str = DEPLOY_PARTITIONED
    #: Per image: ``enclave_flops``/``total_flops`` and ``enclave_param_bytes``/``total_param_bytes``.
    cost: dict[str, int] | None = None


def key_path_for(bundle_dir: Path) -> Path:
    """``BUNDLE.key`` beside ``BUNDLE/``."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".key")


def owner_key_path_for(bundle_dir: Path) -> Path:
    """``BUNDLE.owner.key`` beside ``BUNDLE/``: the owner's Ed25519 manifest-signing key."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".owner.key")


def default_state_dir(bundle_dir: Path) -> Path:
    """``BUNDLE.state`` beside ``BUNDLE/``: where `serve` keeps sealed state by default."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".state")


def local_sim_signer(state_dir: Path) -> str | None:
    """Hex of the sim backend's evidence-signing public key in *state_dir*, if one exists."""
    from infenclave.enclave.evidence import SIM_SIGNING_KEY_FILE

    path = Path(state_dir) / SIM_SIGNING_KEY_FILE
    if not path.is_file():
        return None
    return ed25519_public_key(load_or_create_key_file(path, ED25519_KEY_SIZE)).hex()


def policy_path_for(bundle_dir: Path) -> Path:
    """``BUNDLE.policy.json`` beside ``BUNDLE/``."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".policy.json")


@functools.cache
def sim_measurement() -> bytes:
    """The ``sim`` measurement of the installed enclave program, as the program computes it.

    Runs ``python -m infenclave.enclave --measure`` in a fresh interpreter, so the value comes
    from the enclave's own imports (`infenclave.protocol.measurement`), not from a second
    list kept here that could drift from what runs.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", "infenclave.enclave", "--measure"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return bytes.fromhex(json.loads(done.stdout)["measurement"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        raise BundleError(
            "could not measure the enclave program (python -m infenclave.enclave --measure failed)"
        ) from exc


def partition(
    model: Any,
    front_end: str | None,
    tail_start: str | None,
    out: Path,
    *,
    mrenclave: tuple[str, ...] = (),
    mrsigner: tuple[str, ...] = (),
    force: bool = False,
    unverified_backnet: bool = False,
    whole_model: bool = False,
) -> PartitionResult:
    """Split *model* (a `LoadedModel`) at the two cut points and write the bundle to *out*;
    with *whole_model* (and no cut points) write a whole-model bundle instead.

    Refuses to overwrite an existing bundle, key or policy unless *force*: overwriting the
    key of a bundle that is already deployed would lock its owner out.
    """
    if whole_model != (front_end is None and tail_start is None):
        raise UsageError("give either both cut points (a split) or none (the whole model in the enclave)")
    out = Path(out)
    key_file, policy_file = key_path_for(out), policy_path_for(out)
    existing = [p for p in (out, key_file, policy_file) if os.path.lexists(p)]
    if existing and not force:
        raise UsageError(f"{', '.join(map(str, existing))} already exist(s); pass --force to replace")
    owner_key = load_or_create_key_file(owner_key_path_for(out), ED25519_KEY_SIZE)
    owner_public = ed25519_public_key(owner_key).hex()
    parts = (
        _whole_parts(model)
        if front_end is None or tail_start is None
        else _split_parts(model, front_end, tail_start, verified=not unverified_backnet)
    )
    manifest_bytes = _manifest_bytes(model, parts, owner_public)
    manifest = parse_manifest(manifest_bytes)  # what we write is what readers accept
    key = generate_aead_key()
    measurement = sim_measurement().hex()

    if force:
        _remove(out, key_file, policy_file)
    out.mkdir(parents=True)
    _write(out / MANIFEST_FILE, manifest_bytes)
    _write(out / SIGNATURE_FILE, ed25519_sign(owner_key, manifest_bytes))
    if "backnet" in parts.plaintext:
        _write(out / PART_FILES["backnet"], parts.plaintext["backnet"])
    if parts.backnet_policy is not None and parts.backnet_policy.verified:
        _write(out / VERIFY_FILE, parts.verify_file)
    for name in (n for n in ENCRYPTED_PARTS if n in parts.plaintext):
        _write(out / PART_FILES[name], aead_encrypt(key, parts.plaintext[name], part_aad(manifest.digest, name)))
    write_key_file(key_file, ModelKey(manifest.model_id, key))
    policy_file.write_text(
        json.dumps(
            starter_policy(
                measurement,
                model_id=manifest.model_id,
                owner_key=owner_public,
                sim_signer=local_sim_signer(default_state_dir(out)),
                mrenclave=mrenclave,
                mrsigner=mrsigner,
            ),
            indent=2,
        )
        + "\n"
    )
    return PartitionResult(
        bundle_dir=out,
        key_file=key_file,
        policy_file=policy_file,
        model_id=manifest.model_id,
        front_end=None if parts.front_end is None else parts.front_end.name,
        tail_start=None if parts.tail_start is None else parts.tail_start.name,
        sim_measurement=measurement,
        part_sizes={name: len(data) for name, data in parts.plaintext.items()},
        deployment=manifest.deployment,
        cost=parts.cost,
    )


@dataclass(frozen=True)
class _Parts:
    """The parts in plaintext, as the manifest describes them, before encryption."""

    plaintext: dict[str, bytes]  # frontnet, backnet, tail container; or model (a tail container)
    front_end: Any  # graph.CutPoint where the FrontNet ends (None: whole model)
    tail_start: Any  # graph.CutPoint where the Tail starts (None: whole model)
    input_shape: tuple[int, ...]  # per image
    verify_file: bytes
    backnet_policy: BackNetPolicy | None  # None: whole model, no BackNet
    cost: dict[str, int]  # what runs in the enclave, against the whole model (per image)


def _enclave_cost(net: Any, front_end: Any, tail_start: Any) -> dict[str, int]:
    """FLOPs and parameter bytes per image in the enclave (FrontNet + Tail, or everything)."""
    total_params, total_flops, _ = net.part_cost(None, None)
    if front_end is None:
        return {
            "enclave_flops": total_flops,
            "total_flops": total_flops,
            "enclave_param_bytes": total_params,
            "total_param_bytes": total_params,
        }
    front_params, front_flops, _ = net.part_cost(None, front_end)
    tail_params, tail_flops, _ = net.part_cost(tail_start, None)
    return {
        "enclave_flops": front_flops + tail_flops,
        "total_flops": total_flops,
        "enclave_param_bytes": front_params + tail_params,
        "total_param_bytes": total_params,
    }


def _whole_parts(model: Any) -> _Parts:
    """The whole network as one part, packed with its labels like a Tail (no cut, no BackNet)."""
    import onnx.utils

    from infenclave.network import analyse

    net = analyse(model)
    whole = onnx.utils.Extractor(net.onnx_model).extract_model([net.input_name], [net.output_name])
    whole.graph.name = "whole-model"
    container = encode_tail(whole.SerializeToString(), list(model.labels))
    if len(container) > MAX_PART_BYTES:
        raise BundleError(f"model is {len(container)} bytes, over the {MAX_PART_BYTES} limit")
    return _Parts(
        {"model": container}, None, None, tuple(net.input_shape[1:]), b"", None, _enclave_cost(net, None, None)
    )


def _split_parts(model: Any, front_end: str, tail_start: str, *, verified: bool) -> _Parts:
    """Split the model into its three ONNX parts; with *verified*, the BackNet also outputs
    every tensor the enclave checks and the verification file is built beside it."""
    from infenclave.network import analyse
    from infenclave.split import ternary_split

    net = analyse(model)
    split = ternary_split(net, front_end, tail_start)
    parts = split.parts_bytes()  # front/back/tail ONNX bytes
    verify_file, backnet_policy = b"", BackNetPolicy("unverified")
    if verified:
        # Verified by default: the BackNet the host runs also outputs every tensor the
        # enclave checks; an op the verifier does not cover refuses verified mode by name.
        from infenclave.verify_build import UnsupportedOp, build_verification

        try:
            verify_file, checked_back = build_verification(split.back, split.front_end.shape)
        except UnsupportedOp as exc:
            raise UsageError(f"{exc}") from exc
        parts["back"] = checked_back.SerializeToString()
        backnet_policy = BackNetPolicy(
            "freivalds", DEFAULT_MAX_FAILURES, hashlib.sha256(verify_file).hexdigest(), len(verify_file)
        )
    tail_container = encode_tail(parts["tail"], list(model.labels))
    plaintext = {"frontnet": parts["front"], "backnet": parts["back"], "tail": tail_container}
    for name, data in plaintext.items():
        if len(data) > MAX_PART_BYTES:
            raise BundleError(f"{name} is {len(data)} bytes, over the {MAX_PART_BYTES} limit")
    cost = _enclave_cost(net, split.front_end, split.tail_start)
    return _Parts(
        plaintext, split.front_end, split.tail_start, tuple(net.input_shape[1:]), verify_file, backnet_policy, cost
    )


def _manifest_bytes(model: Any, parts: _Parts, owner_public: str) -> bytes:
    """The manifest's exact bytes (sorted keys: its hash is the model id)."""
    whole = parts.front_end is None
    manifest_doc = {
        "format": BUNDLE_FORMAT,
        "deployment": DEPLOY_WHOLE_MODEL if whole else DEPLOY_PARTITIONED,
        "model": model.identity(),
        "preprocess": model.preprocess.to_dict(),
        "output": model.output,
        "num_classes": model.num_classes,
        "input_shape": list(parts.input_shape),
        "cuts": None
        if whole
        else {
            "front_end": _cut_doc(parts.front_end),
            "tail_start": _cut_doc(parts.tail_start),
        },
        "parts": {
            name: {
                "file": PART_FILES[name],
                "encrypted": name in ENCRYPTED_PARTS,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
            for name, data in parts.plaintext.items()
        },
        "owner_key": owner_public,
        "backnet": None if parts.backnet_policy is None else parts.backnet_policy.to_dict(),
    }
    return (json.dumps(manifest_doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


#: The SGX TCB statuses the starter policy accepts. ``UpToDate`` alone would refuse, for ever,
#: every CPU with an advisory microcode cannot fix (LVI, INTEL-SA-00334; MMIO stale data,
#: INTEL-SA-00615): those report ``SWHardeningNeeded`` with current microcode. Accepting it
#: accepts that this enclave's code (CPython, numpy, onnxruntime) is not LVI-hardened; the
#: configuration statuses (e.g. hyper-threading on where it must be off) and ``OutOfDate``
#: stay refused. deploy/gramine/README.md, "TCB statuses, decided".
STARTER_TCB_STATUSES = ("UpToDate", "SWHardeningNeeded")


def starter_policy(
    sim_measurement_hex: str,
    *,
    model_id: str,
    owner_key: str,
    sim_signer: str | None = None,
    mrenclave: tuple[str, ...] = (),
    mrsigner: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The starter client policy for a bundle: this model, this release's measurements, no simulation.

    It names the model twice over: ``model_ids`` (exactly this release) and ``model_signers``
    (any manifest signed with this owner key; drop ``model_ids`` to accept later releases).
    A client refuses a policy that names neither. ``sim_signers`` pins the local sim
    backend's signing key when one exists already (`local_sim_signer`).

    It lists the ``sim`` measurement of the enclave program that ships with this release and,
    when given, SGX MRENCLAVE/MRSIGNER values (from ``make -C deploy/gramine mrenclave``).
    ``allow_simulation`` is false: a client refuses the ``sim`` backend unless its user
    passes ``--allow-simulation`` (`infenclave.client.Client`), which flips only that switch
    and keeps the measurement check.
    """
    tee_types = []
    measurements: dict[str, list[str]] = {}
    if mrenclave or mrsigner:
        tee_types.append("sgx")
        if mrenclave:
            measurements["mrenclave"] = [v.lower() for v in mrenclave]
        if mrsigner:
            measurements["mrsigner"] = [v.lower() for v in mrsigner]
    tee_types.append("simulated")
    measurements["sim"] = [sim_measurement_hex]
    return {
        "tee_types": tee_types,
        "measurements": measurements,
        "allow_debug": False,
        "tcb_statuses": list(STARTER_TCB_STATUSES),
        "allow_simulation": False,
        "max_evidence_age_s": 300,
        "sim_signers": None if sim_signer is None else [sim_signer],
        "model_ids": [model_id],
        "model_signers": [owner_key],
    }


def read_manifest(bundle_dir: Path) -> BundleManifest:
    """Read and structure-check ``BUNDLE/manifest.json``."""
    path = Path(bundle_dir) / MANIFEST_FILE
    return parse_manifest(_read(path, MAX_MANIFEST_BYTES, "manifest"))


def read_signature(bundle_dir: Path) -> bytes | None:
    """The owner's signature over the manifest (``manifest.sig``), or None for an unsigned bundle."""
    path = Path(bundle_dir) / SIGNATURE_FILE
    if not path.is_file():
        return None
    return _read(path, SIGNATURE_BYTES, "manifest signature")


def read_backnet(bundle_dir: Path, manifest: BundleManifest) -> bytes:
    """Read the clear BackNet and check it against the manifest's SHA-256."""
    data = _read(Path(bundle_dir) / PART_FILES["backnet"], MAX_PART_BYTES, "BackNet")
    check_part(manifest, "backnet", data)
    return data


def write_key_file(path: Path, model_key: ModelKey) -> None:
    """Create the owner's key file with mode 0600 (refusing to follow or replace anything)."""
    doc = {"format": KEY_FILE_FORMAT, "model_id": model_key.model_id, "key": model_key.key.hex()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(json.dumps(doc) + "\n")


def read_key_file(path: Path) -> ModelKey:
    """Read an owner key file; refuse one readable by group/others or malformed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        if os.fstat(handle.fileno()).st_mode & 0o077:
            raise UsageError(f"key file {path} is accessible to group/others; chmod 600 it")
        raw = handle.read(_MAX_KEY_FILE_BYTES + 1)
    try:
        doc = json.loads(raw.decode("utf-8"))
        if doc["format"] != KEY_FILE_FORMAT:
            raise ValueError("format")
        model_id, key = doc["model_id"], bytes.fromhex(doc["key"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not an infenclave model key file") from exc
    if len(key) != AEAD_KEY_SIZE or not isinstance(model_id, str) or len(model_id) != 64:
        raise UsageError(f"{path} is not an infenclave model key file")
    return ModelKey(model_id, key)


@dataclass(frozen=True)
class PlanChoice:
    """What a plan recommends: a split at two cut points, or the whole model in the enclave."""

    front_end: str | None  # None: the whole model in the enclave
    tail_start: str | None
    verdict: str  # the plan's recommendation.verdict
    reason: str  # the plan's own words

    @property
    def whole_model(self) -> bool:
        """No cut point is safe (or the evidence is too thin): keep every layer in the enclave."""
        return self.front_end is None


def read_plan(path: Path, weights_sha256: str | None = None) -> PlanChoice:
    """The deployment an assessment ``plan.json`` recommends: its FrontNet end and Tail
    start, or (``partition`` null: no safe cut, or not enough evidence for one) the whole
    model in the enclave, with the plan's own reason.

    The plan is read by the assessment's own reader (`infenclave.assess.plan.Plan.parse`:
    format, version and JSON schema), so there is one reader for the format. A partial plan
    and a plan for other weights (when *weights_sha256* is given) are refused.
    """
    from infenclave.assess.plan import Plan

    raw = _read(Path(path), 64 * 1024 * 1024, "plan")
    try:
        plan = Plan.parse(raw)
    except AssessmentError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    if weights_sha256 is not None and plan.weights_sha256 != weights_sha256:
        raise UsageError(
            f"{path} was made for other weights ({plan.weights_sha256[:12]}...) "
            f"than this model's ({weights_sha256[:12]}...)"
        )
    if plan.partial:
        raise UsageError(f"{path} is a partial (interrupted) assessment: run it to the end")
    partition, reason = plan.doc["partition"], str(plan.doc["recommendation"]["reason"])
    if partition is None:
        return PlanChoice(None, None, plan.verdict, reason)
    return PlanChoice(str(partition["frontnet"]["end"]), str(partition["tail"]["start"]), plan.verdict, reason)


def manifest_model_id(bundle_dir: Path) -> str:
    """The model id of a bundle: SHA-256 of its manifest bytes."""
    return model_id_of(_read(Path(bundle_dir) / MANIFEST_FILE, MAX_MANIFEST_BYTES, "manifest"))


def _cut_doc(cut: Any) -> dict[str, Any]:
    return {"name": cut.name, "tensor": cut.tensor, "shape": list(cut.shape)}


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)


def _remove(out: Path, *files: Path) -> None:
    import shutil

    if out.is_dir() and not out.is_symlink():
        if not (out / MANIFEST_FILE).exists() and any(out.iterdir()):
            raise UsageError(f"{out} exists and is not a bundle; refusing to delete it")
        shutil.rmtree(out)
    elif os.path.lexists(out):
        out.unlink()
    for path in files:
        if os.path.lexists(path):
            path.unlink()


def _read(path: Path, limit: int, what: str) -> bytes:
    from infenclave.protocol.files import read_bounded

    return read_bounded(path, limit, f"the {what}", BundleError)
