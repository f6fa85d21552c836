"""The partitioned-bundle format, as the enclave reads it (parse, then verify).

The enclave parses and checks bundles with this module; the writer (`infenclave.bundle`,
which needs onnx and the model zoo) and the host import it too, never the other way round.

A bundle is a directory::

    manifest.json        public: model identity, preprocessing, number of classes, cut points,
                         per part the file name, SHA-256 and size of the *plaintext*, format
                         version. Never the label names.
    frontnet.onnx.enc    AES-256-GCM(model key, FrontNet ONNX)
    tail.bin.enc         AES-256-GCM(model key, tail container: Tail ONNX + label list)
    backnet.onnx         the BackNet in the clear (the host runs it)
    manifest.sig         Ed25519(owner key, manifest.json bytes), raw 64 bytes; present when
                         the manifest names an ``owner_key`` (hex of the raw public key)

The manifest's ``deployment`` says which of two layouts the bundle has, explicitly (no default
a host could fall back to): ``partitioned`` is the layout above; ``whole-model-in-enclave``
(when no cut point is safe) has ``cuts`` and ``backnet`` null and one part, ``model``:
``model.bin.enc``, AES-256-GCM(model key, the whole network as a tail container). Nothing
runs on the host and no IR leaves the enclave. A manifest whose parts, cuts or BackNet
section do not match its deployment is refused; since the model id is the manifest's hash
(and the owner signs it), a host cannot turn one kind of bundle into the other.

The owner signature lets a client policy accept "any release this owner signed"
(``model_signers``) instead of listing model ids, and lets the enclave refuse a manifest that
names an owner but was not signed by it (a host editing a signed release).

Model id = SHA-256 of the exact ``manifest.json`` bytes (hex). Every encrypted part is
``nonce || ciphertext || tag`` with associated data
``context(b"infenclave/bundle-part/v1", sha256(manifest.json), part name)``: the manifest hash
binds each blob to this manifest (editing any byte of the manifest makes every blob fail),
the part name stops a FrontNet blob from being presented as the Tail. After decryption the
plaintext's SHA-256 must equal the manifest's: the key and the manifest are then known to
belong together.

The tail container (version 1) is ``b"IETAIL1\\n" || u64be(len(onnx)) || onnx ||
u64be(len(labels)) || labels`` with ``labels`` a UTF-8 JSON list of strings, one per class.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from infenclave.crypto import aead_decrypt, context
from infenclave.errors import BundleError, CryptoError, IntegrityError
from infenclave.protocol.backnet_verify import BackNetPolicy, parse_backnet_section
from infenclave.protocol.strict_json import loads_object

__all__ = [
    "BUNDLE_FORMAT",
    "DEPLOY_PARTITIONED",
    "DEPLOY_WHOLE_MODEL",
    "MANIFEST_FILE",
    "SIGNATURE_BYTES",
    "SIGNATURE_FILE",
    "MAX_MANIFEST_BYTES",
    "MAX_PART_BYTES",
    "PART_AAD_TAG",
    "PART_FILES",
    "TAIL_MAGIC",
    "BundleManifest",
    "CutInfo",
    "PartInfo",
    "decode_tail",
    "decrypt_part",
    "encode_tail",
    "model_id_of",
    "parse_manifest",
    "part_aad",
]

BUNDLE_FORMAT = "infenclave-bundle/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
SIGNATURE_BYTES = 64
PART_AAD_TAG = b"infenclave/bundle-part/v1"
TAIL_MAGIC = b"IETAIL1\n"
#: Fixed file names: the manifest cannot point the enclave at another path.
PART_FILES = dict(frontnet="frontnet.onnx.enc", backnet="backnet.onnx", tail="tail.bin.enc", model="model.bin.enc")
ENCRYPTED_PARTS = ("frontnet", "tail", "model")
DEPLOY_PARTITIONED = "partitioned"
#: The whole network in the enclave: an empty BackNet, no IR1 or IR2 frame.
DEPLOY_WHOLE_MODEL = "whole-model-in-enclave"
#: The parts each deployment has, exactly.
DEPLOYMENT_PARTS = {DEPLOY_PARTITIONED: ("frontnet", "backnet", "tail"), DEPLOY_WHOLE_MODEL: ("model",)}

#: A manifest is a few KiB; refuse anything that is clearly not one.
MAX_MANIFEST_BYTES = 256 * 1024
#: The parts of the models we target are at most tens of MiB (Lite2's BackNet: ~20 MiB).
MAX_PART_BYTES = 512 * 1024 * 1024
#: ImageNet has 1000 classes; a label list is bounded to keep the Tail's parsing cheap.
MAX_CLASSES = 100_000
MAX_LABEL_BYTES = 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = frozenset(
    "format deployment model preprocess output num_classes input_shape cuts parts owner_key backnet".split()
)


@dataclass(frozen=True)
class PartInfo:
    """One part as the manifest describes it (plaintext digest and size)."""

    name: str
    file: str
    encrypted: bool
    sha256: str
    size: int


@dataclass(frozen=True)
class CutInfo:
    """A cut point as the manifest records it: name, ONNX tensor, per-image shape."""

    name: str
    tensor: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BundleManifest:
    """A parsed manifest whose *structure* is checked. `raw` are the exact file bytes.

    A whole-model manifest has no cuts and no BackNet (`front_end`, `tail_start`, `backnet`
    None) and one part, ``model``."""

    raw: bytes
    model_id: str
    model: dict[str, Any]
    preprocess: dict[str, Any]
    output: str
    num_classes: int
    input_shape: tuple[int, ...]
    front_end: CutInfo | None
    tail_start: CutInfo | None
    parts: dict[str, PartInfo]
    owner_key: bytes | None
    backnet: BackNetPolicy | None
    deployment: str

    @property
    def whole_model(self) -> bool:
        """True for a whole-model-in-enclave bundle: nothing for the host to run."""
        return self.deployment == DEPLOY_WHOLE_MODEL

    @property
    def digest(self) -> bytes:
        """SHA-256 of the manifest bytes (the model id, as bytes)."""
        return bytes.fromhex(self.model_id)


def model_id_of(manifest_bytes: bytes) -> str:
    """The model id: lower-case hex SHA-256 of the exact manifest bytes."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def part_aad(manifest_digest: bytes, part: str) -> bytes:
    """Associated data of an encrypted part (see module docstring)."""
    return context(PART_AAD_TAG, manifest_digest, part)


def parse_manifest(raw: bytes) -> BundleManifest:
    """Parse and structure-check manifest bytes; `BundleError` on anything unexpected."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    doc = loads_object(raw, "manifest", BundleError)
    if set(doc) != _MANIFEST_KEYS:
        raise BundleError(f"manifest: expected exactly the keys {sorted(_MANIFEST_KEYS)}")
    if doc["format"] != BUNDLE_FORMAT:
        raise BundleError(f"manifest: format {doc['format']!r} is not {BUNDLE_FORMAT!r}")
    model, preprocess = doc["model"], doc["preprocess"]
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise BundleError("manifest: model must be an object with a name")
    if not isinstance(preprocess, dict):
        raise BundleError("manifest: preprocess must be an object")
    if doc["output"] not in ("logits", "probabilities"):
        raise BundleError("manifest: output must be 'logits' or 'probabilities'")
    num_classes = doc["num_classes"]
    if not _is_int(num_classes) or not 2 <= num_classes <= MAX_CLASSES:
        raise BundleError(f"manifest: num_classes must be an integer in 2..{MAX_CLASSES}")
    deployment = doc["deployment"]
    if deployment not in DEPLOYMENT_PARTS:
        raise BundleError(f"manifest: deployment must be one of {sorted(DEPLOYMENT_PARTS)}")
    whole = deployment == DEPLOY_WHOLE_MODEL
    cuts, backnet = doc["cuts"], doc["backnet"]
    if whole and (cuts is not None or backnet is not None):  # fail closed: no half-split bundle
        raise BundleError("manifest: a whole-model bundle has no cuts and no backnet section")
    if not whole and (not isinstance(cuts, dict) or set(cuts) != {"front_end", "tail_start"}):
        raise BundleError("manifest: cuts must name front_end and tail_start")
    parts_doc = doc["parts"]
    if not isinstance(parts_doc, dict) or set(parts_doc) != set(DEPLOYMENT_PARTS[deployment]):
        raise BundleError(
            f"manifest: the parts of a {deployment} bundle must be exactly {DEPLOYMENT_PARTS[deployment]}"
        )
    parts = {name: _part(name, parts_doc[name]) for name in DEPLOYMENT_PARTS[deployment]}
    owner_key = doc["owner_key"]
    if owner_key is not None and (not isinstance(owner_key, str) or _HEX64.fullmatch(owner_key) is None):
        raise BundleError("manifest: owner_key must be null or 64 lower-case hex digits")
    return BundleManifest(
        raw=bytes(raw),
        model_id=model_id_of(raw),
        model=model,
        preprocess=preprocess,
        output=doc["output"],
        num_classes=num_classes,
        input_shape=_shape("input_shape", doc["input_shape"]),
        front_end=None if whole else _cut("front_end", cuts["front_end"]),
        tail_start=None if whole else _cut("tail_start", cuts["tail_start"]),
        parts=parts,
        owner_key=None if owner_key is None else bytes.fromhex(owner_key),
        backnet=None if whole else parse_backnet_section(backnet),
        deployment=deployment,
    )


def decrypt_part(manifest: BundleManifest, part: str, blob: bytes, key: bytes) -> bytes:
    """Decrypt an encrypted part and check it against the manifest; return the plaintext.

    Order: the AEAD tag first (nothing is parsed before the ciphertext is authenticated),
    then size and SHA-256 against the manifest, compared in constant time.
    """
    if part not in ENCRYPTED_PARTS or part not in manifest.parts:
        raise BundleError(f"part {part!r} is not an encrypted part of this bundle")
    try:
        plaintext = aead_decrypt(key, blob, part_aad(manifest.digest, part))
    except CryptoError as exc:
        raise BundleError(f"{part}: does not decrypt with this key and manifest (wrong key, or tampered)") from exc
    check_part(manifest, part, plaintext)
    return plaintext


def check_part(manifest: BundleManifest, part: str, plaintext: bytes) -> None:
    """Refuse a part whose size or SHA-256 differs from the manifest's."""
    info = manifest.parts.get(part)
    if info is None:
        raise BundleError(f"{part}: this bundle has no such part")
    digest = hashlib.sha256(plaintext).hexdigest()
    if len(plaintext) != info.size or not hmac.compare_digest(digest, info.sha256):
        raise IntegrityError(f"{part}: does not match the manifest's SHA-256 (tampered or mixed up)")


def encode_tail(onnx_bytes: bytes, labels: list[str]) -> bytes:
    """Pack the Tail ONNX and its label list into one container (the inverse of `decode_tail`)."""
    labels_json = json.dumps(list(labels), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return (
        TAIL_MAGIC + struct.pack(">Q", len(onnx_bytes)) + onnx_bytes + struct.pack(">Q", len(labels_json)) + labels_json
    )


def decode_tail(container: bytes, num_classes: int) -> tuple[bytes, list[str]]:
    """Unpack a tail container into (Tail ONNX bytes, labels); refuse any inconsistency."""
    view = memoryview(container)
    if bytes(view[: len(TAIL_MAGIC)]) != TAIL_MAGIC:
        raise BundleError("tail: not a version-1 tail container")
    pos = len(TAIL_MAGIC)
    onnx_bytes, pos = _take(view, pos, "tail ONNX")
    labels_raw, pos = _take(view, pos, "label list")
    if pos != len(view):
        raise BundleError("tail: trailing bytes after the label list")
    try:
        labels = json.loads(bytes(labels_raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError("tail: the label list is not UTF-8 JSON") from exc
    if not isinstance(labels, list) or len(labels) != num_classes:
        raise BundleError(f"tail: the label list must hold exactly {num_classes} labels")
    for label in labels:
        if not isinstance(label, str) or len(label.encode("utf-8")) > MAX_LABEL_BYTES:
            raise BundleError(f"tail: every label must be a string of at most {MAX_LABEL_BYTES} bytes")
    return bytes(onnx_bytes), labels


def _take(view: memoryview, pos: int, what: str) -> tuple[memoryview, int]:
    if pos + 8 > len(view):
        raise BundleError(f"tail: truncated before the {what}")
    (length,) = struct.unpack(">Q", view[pos : pos + 8])
    pos += 8
    if length > len(view) - pos:
        raise BundleError(f"tail: the {what} runs past the end of the container")
    return view[pos : pos + length], pos + length


def _part(name: str, doc: Any) -> PartInfo:
    if not isinstance(doc, dict) or set(doc) != {"file", "encrypted", "sha256", "size"}:
        raise BundleError(f"manifest: part {name} must have file, encrypted, sha256, size")
    if doc["file"] != PART_FILES[name]:
        raise BundleError(f"manifest: part {name} must be stored as {PART_FILES[name]!r}")
    if doc["encrypted"] is not (name in ENCRYPTED_PARTS):
        raise BundleError(f"manifest: part {name} has the wrong encrypted flag")
    if not isinstance(doc["sha256"], str) or _HEX64.fullmatch(doc["sha256"]) is None:
        raise BundleError(f"manifest: part {name} sha256 must be 64 lower-case hex digits")
    if not _is_int(doc["size"]) or not 0 < doc["size"] <= MAX_PART_BYTES:
        raise BundleError(f"manifest: part {name} size must be 1..{MAX_PART_BYTES}")
    return PartInfo(name, doc["file"], doc["encrypted"], doc["sha256"], doc["size"])


def _cut(key: str, doc: Any) -> CutInfo:
    if not isinstance(doc, dict) or set(doc) != {"name", "tensor", "shape"}:
        raise BundleError(f"manifest: cuts.{key} must have name, tensor, shape")
    if not isinstance(doc["name"], str) or not isinstance(doc["tensor"], str):
        raise BundleError(f"manifest: cuts.{key} name and tensor must be strings")
    return CutInfo(doc["name"], doc["tensor"], _shape(f"cuts.{key}.shape", doc["shape"]))


def _shape(key: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= 4
        or not all(_is_int(v) and 0 < v <= 1 << 16 for v in value)
    ):
        raise BundleError(f"manifest: {key} must be a list of 1-4 positive integers")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
