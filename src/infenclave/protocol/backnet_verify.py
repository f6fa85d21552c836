"""The BackNet verification file (``backnet.verify``) and the manifest's ``backnet`` section.

Why a file of its own and not the ONNX graph: the enclave checks the host's BackNet work
(`infenclave.enclave.verify`) and needs the BackNet's operators and weights for it. Parsing
ONNX would pull the ``onnx`` protobuf package into the trusted computing base; this format is
a short JSON header and raw float32 arrays, parsed here with numpy and strict bounds.
`partition` writes it from the same graph as ``backnet.onnx`` (`infenclave.verify_build`);
the manifest holds its SHA-256 and size, so the model id covers it.

Layout::

    b"IEVERIFY1\\n" | u32be header_len | header (UTF-8 JSON object) | blob (float32, little-endian)

Header ``{"format": "infenclave-backnet-verify/1", "input": [1, C, H, W], "ops": [...],
"sent": [...], "output": id}``. Tensor 0 is IR1; op *i* (0-based) reads earlier tensors and
writes tensor *i* + 1 of per-request shape ``op["shape"]`` (batch axis 1 included). Each op is
``{"op", "in": [ids], "shape", "attrs": {...}, "weights": {name: [byte offset, shape]}}``.
``sent`` lists, in frame order, the tensors the host sends after IR2 (the outputs of the ops
that cannot be recomputed bit for bit); ``output`` is the id of IR2.

Manifest section (covered by the model id)::

    "backnet": {"verification": "freivalds", "max_failures": 1, "file": "backnet.verify",
                "sha256": hex, "size": n}
    "backnet": {"verification": "unverified"}
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from infenclave.errors import BundleError
from infenclave.protocol.strict_json import loads_object

__all__ = [
    "MAGIC",
    "OPS",
    "VERIFY_FILE",
    "VERIFY_FORMAT",
    "BackNetPolicy",
    "VerifyOp",
    "VerifySpec",
    "check_verify_file",
    "encode_verify_file",
    "parse_backnet_section",
    "parse_verify_file",
]

MAGIC = b"IEVERIFY1\n"
VERIFY_FORMAT = "infenclave-backnet-verify/1"
VERIFY_FILE = "backnet.verify"
#: Header JSON: a few hundred bytes per op.
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: ResNet-50 has ~180 operators; an order of magnitude more is not a classifier we serve.
MAX_OPS = 4096
#: Weights of the BackNets we target are at most ~100 MiB (ResNet-50: ~100 MiB in float32).
MAX_BLOB_BYTES = 512 * 1024 * 1024
#: One tensor (per request) is at most 2^26 floats (256 MiB); dimensions as in frames.
MAX_TENSOR_ELEMENTS = 1 << 26
MAX_DIM = 1 << 16
#: Consecutive failed checks after which a worker refuses everything (manifest bound).
MAX_FAILURES_LIMIT = 16

#: op -> (number of tensor inputs (min, max), attribute keys, required weights, optional weights)
OPS: dict[str, tuple[tuple[int, int], frozenset[str], frozenset[str], frozenset[str]]] = {
    "conv": ((1, 1), frozenset({"group", "strides", "pads", "dilations"}), frozenset({"weight"}), frozenset({"bias"})),
    "linear": ((1, 1), frozenset(), frozenset({"weight"}), frozenset({"bias"})),
    "add": ((1, 2), frozenset(), frozenset(), frozenset({"const"})),
    "mul": ((1, 2), frozenset(), frozenset(), frozenset({"const"})),
    "clip": ((1, 1), frozenset({"min", "max"}), frozenset(), frozenset()),
    "sigmoid": ((1, 1), frozenset(), frozenset(), frozenset()),
    "pad": ((1, 1), frozenset({"pads"}), frozenset(), frozenset()),
    "reshape": ((1, 1), frozenset(), frozenset(), frozenset()),
    "gap": ((1, 1), frozenset(), frozenset(), frozenset()),
    "maxpool": ((1, 1), frozenset({"kernel", "strides", "pads"}), frozenset(), frozenset()),
    "batchnorm": ((1, 1), frozenset({"epsilon"}), frozenset({"scale", "bias", "mean", "var"}), frozenset()),
    "concat": ((1, 64), frozenset({"axis"}), frozenset(), frozenset()),
}
#: Ops whose outputs the host sends (not reproducible bit for bit in the enclave).
SENT_OPS = frozenset({"conv", "linear", "sigmoid", "gap", "batchnorm"})


@dataclass(frozen=True)
class BackNetPolicy:
    """The manifest's ``backnet`` section."""

    verification: str  # "freivalds" | "unverified"
    max_failures: int = 0
    sha256: str = ""
    size: int = 0

    @property
    def verified(self) -> bool:
        return self.verification == "freivalds"

    def to_dict(self) -> dict[str, Any]:
        if not self.verified:
            return {"verification": "unverified"}
        return {
            "verification": "freivalds",
            "max_failures": self.max_failures,
            "file": VERIFY_FILE,
            "sha256": self.sha256,
            "size": self.size,
        }


@dataclass(frozen=True)
class VerifyOp:
    """One BackNet operator as the verifier sees it (structure checked, semantics not yet)."""

    op: str
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    attrs: dict[str, Any]
    weights: dict[str, np.ndarray]  # float32, read-only views of the blob


@dataclass(frozen=True)
class VerifySpec:
    """A parsed verification file."""

    input_shape: tuple[int, ...]
    ops: tuple[VerifyOp, ...]
    sent: tuple[int, ...]
    output: int

    def shape_of(self, tensor: int) -> tuple[int, ...]:
        return self.input_shape if tensor == 0 else self.ops[tensor - 1].shape


def parse_backnet_section(doc: Any) -> BackNetPolicy:
    """Structure-check the manifest's ``backnet`` section."""
    if not isinstance(doc, dict) or "verification" not in doc:
        raise BundleError("manifest: backnet must be an object with a verification mode")
    if doc["verification"] == "unverified":
        if set(doc) != {"verification"}:
            raise BundleError("manifest: an unverified backnet has no other keys")
        return BackNetPolicy("unverified")
    if doc["verification"] != "freivalds":
        raise BundleError("manifest: backnet.verification must be 'freivalds' or 'unverified'")
    if set(doc) != {"verification", "max_failures", "file", "sha256", "size"}:
        raise BundleError("manifest: a verified backnet has exactly verification, max_failures, file, sha256, size")
    failures, size, digest = doc["max_failures"], doc["size"], doc["sha256"]
    if not _is_int(failures) or not 1 <= failures <= MAX_FAILURES_LIMIT:
        raise BundleError(f"manifest: backnet.max_failures must be 1..{MAX_FAILURES_LIMIT}")
    if doc["file"] != VERIFY_FILE:
        raise BundleError(f"manifest: backnet.file must be {VERIFY_FILE!r}")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BundleError("manifest: backnet.sha256 must be 64 lower-case hex digits")
    if not _is_int(size) or not 0 < size <= MAX_BLOB_BYTES + MAX_HEADER_BYTES + 64:
        raise BundleError("manifest: backnet.size out of range")
    return BackNetPolicy("freivalds", failures, digest, size)


def check_verify_file(policy: BackNetPolicy, data: bytes) -> None:
    """Refuse a verification file whose size or SHA-256 differs from the manifest's."""
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != policy.size or not hmac.compare_digest(digest, policy.sha256):
        raise BundleError("backnet.verify: does not match the manifest's SHA-256")


def encode_verify_file(header: dict[str, Any], blob: bytes) -> bytes:
    """Assemble a verification file (the writer is `infenclave.verify_build`)."""
    import json

    raw = json.dumps({"format": VERIFY_FORMAT, **header}, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack(">I", len(raw)) + raw + blob


def parse_verify_file(data: bytes | bytearray | memoryview) -> VerifySpec:
    """Parse a verification file; `BundleError` on anything out of its bounds."""
    view = memoryview(data).cast("B")
    if len(view) < len(MAGIC) + 4 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise BundleError("backnet.verify: not a version-1 verification file")
    (header_len,) = struct.unpack(">I", view[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if header_len > MAX_HEADER_BYTES or start + header_len > len(view):
        raise BundleError("backnet.verify: header length out of range")
    doc = loads_object(view[start : start + header_len], "backnet.verify header", BundleError)
    blob = view[start + header_len :]
    if len(blob) > MAX_BLOB_BYTES or len(blob) % 4:
        raise BundleError("backnet.verify: weight blob size out of range")
    if set(doc) != {"format", "input", "ops", "sent", "output"} or doc["format"] != VERIFY_FORMAT:
        raise BundleError(f"backnet.verify: header must be a {VERIFY_FORMAT} document")
    floats = np.frombuffer(blob, dtype="<f4")
    floats.flags.writeable = False
    ops_doc = doc["ops"]
    if not isinstance(ops_doc, list) or not 1 <= len(ops_doc) <= MAX_OPS:
        raise BundleError(f"backnet.verify: 1..{MAX_OPS} ops")
    input_shape = _shape(doc["input"], "input")
    ops = tuple(_op(i, op, floats) for i, op in enumerate(ops_doc))
    sent, output = doc["sent"], doc["output"]
    n = len(ops)
    if not _is_int(output) or not 1 <= output <= n:
        raise BundleError("backnet.verify: output must name an op's tensor")
    if (
        not isinstance(sent, list)
        or len(set(map(str, sent))) != len(sent)
        or not all(_is_int(t) and 1 <= t <= n for t in sent)
    ):
        raise BundleError("backnet.verify: sent must list distinct op tensors")
    expected = [i + 1 for i, op in enumerate(ops) if op.op in SENT_OPS and i + 1 != output]
    if sent != expected:
        raise BundleError("backnet.verify: sent must list exactly the checked op outputs, in order")
    return VerifySpec(input_shape, ops, tuple(sent), output)


def _op(index: int, doc: Any, floats: np.ndarray) -> VerifyOp:
    where = f"backnet.verify: op {index}"
    if not isinstance(doc, dict) or set(doc) != {"op", "in", "shape", "attrs", "weights"}:
        raise BundleError(f"{where}: must have exactly op, in, shape, attrs, weights")
    kind = doc["op"]
    if kind not in OPS:
        raise BundleError(f"{where}: unknown op")
    (lo, hi), attr_keys, required, optional = OPS[kind]
    inputs = doc["in"]
    if (
        not isinstance(inputs, list)
        or not lo <= len(inputs) <= hi
        or not all(_is_int(t) and 0 <= t <= index for t in inputs)
    ):
        raise BundleError(f"{where}: inputs must be {lo}..{hi} earlier tensors")
    attrs, weights_doc = doc["attrs"], doc["weights"]
    if not isinstance(attrs, dict) or set(attrs) != attr_keys:
        raise BundleError(f"{where}: attrs must be exactly {sorted(attr_keys)}")
    for value in attrs.values():
        if not (
            value is None
            or _is_number(value)
            or (isinstance(value, list) and len(value) <= 8 and all(_is_int(v) for v in value))
        ):
            raise BundleError(f"{where}: attrs must be numbers, null or short integer lists")
    if not isinstance(weights_doc, dict) or not required <= set(weights_doc) <= required | optional:
        raise BundleError(f"{where}: weights must be {sorted(required)} (+ {sorted(optional)})")
    weights = {name: _weight(ref, floats, f"{where} {name}") for name, ref in weights_doc.items()}
    return VerifyOp(kind, tuple(inputs), _shape(doc["shape"], where), attrs, weights)


def _weight(ref: Any, floats: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(ref, list) or len(ref) != 2 or not _is_int(ref[0]) or ref[0] % 4:
        raise BundleError(f"{where}: a weight is [aligned byte offset, shape]")
    shape = _shape(ref[1], where, min_dims=0)
    start, count = ref[0] // 4, int(np.prod(shape, dtype=np.int64))
    if start < 0 or start + count > len(floats):
        raise BundleError(f"{where}: runs past the weight blob")
    return floats[start : start + count].reshape(shape)


def _shape(value: Any, where: str, min_dims: int = 1) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not min_dims <= len(value) <= 4
        or not all(_is_int(d) and 0 < d <= MAX_DIM for d in value)
    ):
        raise BundleError(f"{where}: shape must be {min_dims}-4 positive dimensions")
    if int(np.prod(value, dtype=np.int64)) > MAX_TENSOR_ELEMENTS:
        raise BundleError(f"{where}: tensor too large")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
