"""The enclave program: key handling, FrontNet and Tail, one request at a time per stage.

This is the trusted computing base. It imports only the standard library, numpy, Pillow,
onnxruntime, cryptography and ``infenclave.{errors, crypto, protocol.*, enclave.*}``;
never the host, the model zoo or torch. It runs fixed code on data: FrontNet and Tail are
ONNX graphs (no Python from a bundle, no unpickling).

What it does, per message from the host (`infenclave.protocol.frames`):

1. At start: a fresh X25519 key pair, generated inside and never written anywhere. The
   public key goes to the host in HELLO.
2. LOAD(bundle): read the bundle's manifest and encrypted parts from ``--bundles`` (untrusted
   storage: nothing is used before it is authenticated). A manifest that names an owner key
   must carry that owner's signature (``manifest.sig``), or the bundle is refused.
3. EVIDENCE(nonce): evidence whose report data binds this enclave's public key, the loaded
   model's id and the nonce (`protocol.binding`); no evidence before a bundle is loaded.
4. PROVISION(sealed key): open the owner's HPKE message (context: model id = manifest
   hash), decrypt FrontNet and Tail with it and check them against the manifest — and, before
   loading them, that they are pure ONNX data (`onnx_runner.check_model_is_data`) — then seal
   the key to this enclave's identity (`sealing`) and hand the blob to the host to store. A
   second provisioning is refused: ``already_provisioned`` with the same key,
   ``other_key_provisioned`` with another.
   UNSEAL(blob) does the same from a stored blob, so a restarted worker serves without the
   owner.
5. REQUEST(request id, sealed request): open it (context: model id, request id), decode the
   image with strict limits, preprocess, run the FrontNet, send IR1 out and remember the
   client's one-time key under the frame tag.
6. IR2(tag): check dtype, shape and finiteness; for a verified BackNet (manifest
   ``backnet.verification = "freivalds"``) check IR2 and the BackNet's intermediates against
   the IR1 kept for this very tag (`enclave.verify`): a failed check fails the request, and
   after the manifest's ``max_failures`` the worker refuses everything until restarted (so
   that accept/reject answers cannot be used to learn the secret projections). Run the
   Tail, take top-k with labels, seal the answer to the client's one-time key (context: model
   id, request id, "response"), padded to a size that depends on the model and k only.

A whole-model bundle (manifest ``deployment = "whole-model-in-enclave"``, chosen when no cut
is safe) has one encrypted part, the whole network: REQUEST runs it and answers RESULT at
once. No IR1 frame is ever sent, and every IR2 frame is refused.

Fail closed: every error ends the request. The host gets one opaque code; the log (stderr,
which the host can read) names the failing step and the exception type, never a message
that could carry data derived from a secret (an image's size, say). A refusal the client
should understand (an image limit) is sealed to the client instead.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from infenclave.crypto import (
    AEAD_KEY_SIZE,
    ed25519_verify,
    generate_keypair,
    open_sealed,
    seal,
)
from infenclave.enclave.imaging import MAX_PIXELS, Preprocess, prepare
from infenclave.enclave.onnx_runner import OnnxPart
from infenclave.enclave.topk import top_k
from infenclave.enclave.verify import BackNetVerifier, CheckFailed
from infenclave.errors import BundleError, CryptoError, EnclaveError, ImageError
from infenclave.protocol.backnet_verify import (
    VERIFY_FILE,
    check_verify_file,
    parse_verify_file,
)
from infenclave.protocol.binding import (
    MAX_NONCE_BYTES,
    MIN_NONCE_BYTES,
    expected_report_data,
)
from infenclave.protocol.bundle_format import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_PART_BYTES,
    PART_FILES,
    SIGNATURE_BYTES,
    SIGNATURE_FILE,
    BundleManifest,
    decode_tail,
    decrypt_part,
    parse_manifest,
)
from infenclave.protocol.frames import (
    SEALED_STATE_UNOPENABLE,
    Frame,
    FrameReader,
    MsgType,
    encode_frame,
    tensor_from_frame,
    tensor_meta,
    tensors_from_frame,
    write_frame,
)
from infenclave.protocol.messages import (
    REQUEST_ID_RE,
    decode_request,
    provision_context,
    request_context,
    response_context,
)

__all__ = ["EnclaveProgram", "MAX_IN_FLIGHT"]

#: Requests between FrontNet and Tail at once; more is a misbehaving host.
MAX_IN_FLIGHT = 1024
#: Seconds after which a request still waiting for its IR2 may be forgotten.
PENDING_TTL_S = 300.0
#: Frames taken from the channel at once (bounds the FrontNet batch).
MAX_DRAIN = 32
#: Request ids remembered to refuse a replayed request (the host could replay ciphertext).
REPLAY_WINDOW = 100_000
#: A refusal sealed to the client is cut to this many characters (it bounds the padding).
MAX_ERROR_CHARS = 200
_BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Sealer(Protocol):
    """`infenclave.enclave.sealing.SimSealer` / `GramineSealer`."""

    tee: str

    def seal(self, data: bytes, label: bytes | str) -> bytes: ...

    def unseal(self, blob: bytes, label: bytes | str) -> bytes: ...


class EvidenceProducer(Protocol):
    """`infenclave.enclave.evidence.SimEvidenceProducer` / `GramineEvidenceProducer`."""

    tee: str

    def evidence(self, report_data: bytes) -> bytes: ...


class _Refused(Exception):
    """End this frame with an opaque error code for the host; `step` goes to the log."""

    def __init__(self, code: str, step: str, cause: BaseException | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.step = step
        self.cause = cause


@dataclass
class _Pending:
    """A request between FrontNet and Tail: what is needed to answer its client."""

    request_id: str
    client_public: bytes
    k: int
    started: float
    stages: dict[str, float]
    ir1: np.ndarray | None = None  # what this enclave sent: IR2 is checked against it


@dataclass
class _Model:
    """The decrypted, checked trusted parts of one bundle."""

    front: OnnxPart  # the whole network for a whole-model bundle
    tail: OnnxPart | None  # None: whole model, the FrontNet's output is the scores
    labels: list[str]
    preprocess: Preprocess
    ir2_shape: tuple[int, ...]  # () for a whole model
    key: bytes  # to tell a repeated provisioning from one with another key
    answer_bytes: tuple[int, int]  # padded answer size: fixed part, per-prediction part


def log(message: str) -> None:
    """One line on stderr, which the host collects. Never pass data derived from secrets."""
    sys.stderr.write(f"enclave[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


class EnclaveProgram:
    """The message loop of one enclave worker (see module docstring)."""

    def __init__(
        self,
        *,
        in_fd: int,
        out_fd: int,
        bundles_dir: Path,
        producer: EvidenceProducer,
        sealer: Sealer,
        measurement: bytes | None,
        sandbox: dict[str, Any] | None,
        threads: int = 1,
    ) -> None:
        self._reader = FrameReader(in_fd)
        self._out = out_fd
        self._bundles_dir = Path(bundles_dir)
        self._producer = producer
        self._sealer = sealer
        self._threads = threads
        self._private_key, self.public_key = generate_keypair()
        self._measurement = measurement
        self._sandbox = sandbox
        self._manifest: BundleManifest | None = None
        self._blobs: dict[str, bytes] = {}
        self._model: _Model | None = None
        self._pending: dict[int, _Pending] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._handlers: dict[MsgType, Any] = {}
        self._verifier: BackNetVerifier | None = None
        self._check_failures = 0
        self._max_pixels = MAX_PIXELS  # LOAD may lower it (the host's cap), never raise it

    # --- loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve frames until the host closes the channel; return the exit code."""
        self._send(
            MsgType.HELLO,
            0,
            {
                "public_key": self.public_key.hex(),
                "tee": self._producer.tee,
                "measurement": None if self._measurement is None else self._measurement.hex(),
                "sandbox": self._sandbox,
                "pid": os.getpid(),
            },
        )
        handlers = {
            MsgType.EVIDENCE: self._on_evidence,
            MsgType.LOAD: self._on_load,
            MsgType.PROVISION: self._on_provision,
            MsgType.UNSEAL: self._on_unseal,
            MsgType.IR2: self._on_ir2,
        }
        self._handlers = handlers
        while True:
            try:
                frames = self._reader.read_available(MAX_DRAIN)
            except EnclaveError as exc:
                log(f"channel broken ({exc}); stopping")
                return 1
            if frames is None:
                log("host closed the channel; stopping")
                return 0
            # Control frames in order; then IR2 frames (each finishes a request: lower latency,
            # fewer in flight); then every queued REQUEST with one batched FrontNet run.
            requests = [f for f in frames if f.type == MsgType.REQUEST]
            for frame in frames:
                if frame.type not in (MsgType.REQUEST, MsgType.IR2):
                    self._dispatch(frame)
            for frame in frames:
                if frame.type == MsgType.IR2:
                    self._dispatch(frame)
            if requests:
                self._on_requests(requests)

    def _dispatch(self, frame: Frame) -> None:
        handler = self._handlers.get(frame.type)
        try:
            if handler is None:
                raise _Refused("bad_frame", f"unexpected frame type {frame.type.name}")
            handler(frame)
        except _Refused as exc:
            self._refuse(frame, exc)
        except Exception as exc:  # noqa: BLE001 - fail closed, keep serving other requests
            self._refuse(frame, _Refused("internal", f"{frame.type.name}: unexpected error", exc))

    def _send(self, msg: MsgType, tag: int, meta: dict[str, Any] | None = None, body: bytes | memoryview = b"") -> None:
        write_frame(self._out, encode_frame(msg, tag, meta, body))

    def _refuse(self, frame: Frame, exc: _Refused) -> None:
        if frame.type == MsgType.IR2:
            self._pending.pop(frame.tag, None)
        cause = f" ({type(exc.cause).__name__})" if exc.cause is not None else ""
        log(f"refused {frame.type.name} tag {frame.tag}: {exc.step}{cause}")
        self._send(MsgType.ERROR, frame.tag, {"error": exc.code})

    # --- attestation and keys -----------------------------------------------------------

    def _on_evidence(self, frame: Frame) -> None:
        try:
            nonce = bytes.fromhex(str(frame.meta.get("nonce", "")))
        except ValueError as exc:
            raise _Refused("bad_nonce", "evidence: the nonce is not hex", exc) from exc
        if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
            raise _Refused("bad_nonce", "evidence: nonce length out of range")
        manifest = self._need_manifest()  # evidence names the model: no model, no evidence
        report_data = expected_report_data(self.public_key, nonce, manifest.model_id)
        # A confidential VM's evidence comes with auxiliary data (the SNP certificate table):
        # the body is raw evidence followed by aux_bytes of it.
        parts = getattr(self._producer, "evidence_parts", None)
        evidence, aux = parts(report_data) if parts else (self._producer.evidence(report_data), b"")
        self._send(MsgType.EVIDENCE_OK, frame.tag, {"tee": self._producer.tee, "aux_bytes": len(aux)}, evidence + aux)

    def _on_load(self, frame: Frame) -> None:
        if self._manifest is not None:
            raise _Refused("already_loaded", "load: a bundle is already loaded")
        name = frame.meta.get("bundle")
        if not isinstance(name, str) or _BUNDLE_NAME.fullmatch(name) is None or ".." in name:
            raise _Refused("bad_bundle", "load: bundle name is not a plain directory name")
        directory = self._bundles_dir / name
        cap = frame.meta.get("max_pixels", MAX_PIXELS)
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise _Refused("bad_bundle", "load: max_pixels is not a positive integer")
        try:
            manifest = parse_manifest(_read(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES))
            blobs = {
                p: _read(directory / PART_FILES[p], MAX_PART_BYTES) for p, i in manifest.parts.items() if i.encrypted
            }
            if manifest.owner_key is not None:
                signature = _read(directory / SIGNATURE_FILE, SIGNATURE_BYTES)
                ed25519_verify(manifest.owner_key, signature, manifest.raw)
        except (OSError, BundleError) as exc:
            raise _Refused("bad_bundle", "load: manifest or parts unreadable or malformed", exc) from exc
        except CryptoError as exc:
            raise _Refused("bad_bundle", "load: the owner's signature over the manifest does not verify", exc) from exc
        if manifest.backnet is not None and manifest.backnet.verified and manifest.front_end and manifest.tail_start:
            try:
                raw = _read(directory / VERIFY_FILE, manifest.backnet.size)
                check_verify_file(manifest.backnet, raw)
                spec = parse_verify_file(raw)
                if spec.input_shape != (1, *manifest.front_end.shape) or spec.shape_of(spec.output) != (
                    1,
                    *manifest.tail_start.shape,
                ):
                    raise BundleError("backnet.verify: input/output shapes differ from the cuts")
                self._verifier = BackNetVerifier(spec)  # fresh secret projections, never stored
            except (OSError, BundleError, ValueError) as exc:
                raise _Refused("bad_bundle", "load: BackNet verification file unusable", exc) from exc
        self._manifest, self._blobs = manifest, blobs
        self._max_pixels = min(cap, MAX_PIXELS)
        log(f"loaded manifest of model {manifest.model_id[:16]}...")
        self._send(MsgType.LOADED, frame.tag, {"model_id": manifest.model_id, "provisioned": False})

    def _on_provision(self, frame: Frame) -> None:
        manifest = self._need_manifest()
        try:
            key = open_sealed(self._private_key, frame.body, context=provision_context(manifest.model_id))
        except CryptoError as exc:
            raise _Refused("refused", "provision: the sealed model key does not open", exc) from exc
        if self._model is not None:
            # The same key again is harmless; another one is a mistake the owner must see.
            same = hmac.compare_digest(key, self._model.key)
            raise _Refused(
                "already_provisioned" if same else "other_key_provisioned",
                "provision: a model key is already installed",
            )
        self._install_key(key, "provision")
        blob = self._sealer.seal(key, _seal_label(manifest.model_id))
        del key
        log("model key provisioned, checked against the bundle and sealed for restarts")
        self._send(MsgType.PROVISIONED, frame.tag, {"model_id": manifest.model_id}, blob)

    def _on_unseal(self, frame: Frame) -> None:
        manifest = self._need_manifest()
        if self._model is not None:
            self._send(MsgType.UNSEALED, frame.tag, {"model_id": manifest.model_id})
            return
        try:
            key = self._sealer.unseal(bytes(frame.body), _seal_label(manifest.model_id))
        except CryptoError as exc:
            # Another build (MRENCLAVE), a TCB/microcode update (the SGX sealing key moves with
            # CPUSVN/ISVSVN/CONFIGSVN) or corruption: a distinct code, so that the host sets the
            # blob aside and asks for provisioning instead of restarting this worker for ever.
            raise _Refused(
                SEALED_STATE_UNOPENABLE, "unseal: the sealed blob does not open for this enclave", exc
            ) from exc
        self._install_key(key, "unseal")
        del key
        log("model key unsealed from stored state")
        self._send(MsgType.UNSEALED, frame.tag, {"model_id": manifest.model_id})

    def _install_key(self, key: bytes, step: str) -> None:
        manifest = self._need_manifest()
        if len(key) != AEAD_KEY_SIZE:
            raise _Refused("refused", f"{step}: the model key has the wrong size")
        whole = manifest.whole_model
        try:
            # A whole model is stored as a tail container (network + labels): run it as the FrontNet.
            front_bytes = b"" if whole else decrypt_part(manifest, "frontnet", self._blobs["frontnet"], key)
            last = "model" if whole else "tail"
            tail_bytes, labels = decode_tail(decrypt_part(manifest, last, self._blobs[last], key), manifest.num_classes)
        except BundleError as exc:
            raise _Refused("refused", f"{step}: encrypted parts do not decrypt or match the manifest", exc) from exc
        try:
            front = OnnxPart(tail_bytes if whole else front_bytes, threads=self._threads)
            tail = None if whole else OnnxPart(tail_bytes, threads=self._threads)
            preprocess = Preprocess.from_dict(manifest.preprocess)
        except Exception as exc:  # ORT raises several types for a bad graph
            raise _Refused("refused", f"{step}: FrontNet/Tail graphs do not load", exc) from exc
        self._model = _Model(
            front,
            tail,
            labels,
            preprocess,
            ir2_shape=() if manifest.tail_start is None else (1, *manifest.tail_start.shape),  # () whole
            key=bytes(key),
            answer_bytes=_answer_sizes(labels),
        )
        self._blobs = {}  # the ciphertext is not needed any more

    def _need_manifest(self) -> BundleManifest:
        if self._manifest is None:
            raise _Refused("not_loaded", "no bundle loaded")
        return self._manifest

    # --- inference ------------------------------------------------------------------------

    def _on_requests(self, frames: list[Frame]) -> None:
        """Open and decode each request, run the FrontNet once on all of them, send IR1s."""
        opened: list[tuple[Frame, _Pending, np.ndarray]] = []
        for frame in frames:
            try:
                item = self._open_request(frame)
            except _Refused as exc:
                self._refuse(frame, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - fail closed, keep serving other requests
                self._refuse(frame, _Refused("internal", "request: unexpected error", exc))
                continue
            if item is not None:
                opened.append((frame, *item))
        if not opened:
            return
        model = self._model
        if model is None:  # unreachable: _open_request checked it
            return
        t0 = time.perf_counter()
        try:
            batch = opened[0][2] if len(opened) == 1 else np.concatenate([x for _, _, x in opened])
            ir1 = np.ascontiguousarray(model.front(batch), dtype=np.float32)  # (B, C, H', W')
        except Exception as exc:  # noqa: BLE001 - every request of the batch fails closed
            for frame, _, _ in opened:
                self._refuse(frame, _Refused("internal", "frontnet: failed", exc))
            return
        front_ms = (time.perf_counter() - t0) * 1e3
        for row, (frame, pending, _) in enumerate(opened):
            if model.tail is None:  # the whole model ran: these are the scores, nothing leaves
                try:
                    self._finish(frame.tag, pending, ir1[row], {**pending.stages, "model_ms": front_ms})
                except _Refused as exc:
                    self._refuse(frame, exc)
                continue
            pending.stages["frontnet_ms"] = front_ms
            pending.ir1 = ir1[row : row + 1].copy()  # (1, C, H', W'): the IR2 check's ground truth
            self._pending[frame.tag] = pending
            one = ir1[row : row + 1]  # (1, C, H', W'), contiguous: a row of a C-order array
            self._send(MsgType.IR1, frame.tag, tensor_meta(one, t=pending.stages), one.data.cast("B"))

    def _open_request(self, frame: Frame) -> tuple[_Pending, np.ndarray] | None:
        """Open one sealed request and preprocess its image; None if it was answered already."""
        manifest = self._need_manifest()
        model = self._model
        if model is None:
            raise _Refused("not_provisioned", "request: no model key yet")
        self._refuse_if_tripped("request")
        if len(self._pending) >= MAX_IN_FLIGHT:
            self._evict_stale()
        if len(self._pending) >= MAX_IN_FLIGHT or frame.tag in self._pending:
            raise _Refused("busy", "request: too many requests in flight, or a reused tag")
        request_id = frame.meta.get("request_id")
        if not isinstance(request_id, str) or REQUEST_ID_RE.fullmatch(request_id) is None:
            raise _Refused("refused", "request: malformed request id")
        if request_id in self._seen:
            raise _Refused("refused", "request: request id already seen (replay)")
        t0 = time.perf_counter()
        try:
            plaintext = open_sealed(
                self._private_key, frame.body, context=request_context(manifest.model_id, request_id)
            )
            image, client_public, k = decode_request(plaintext)
        except CryptoError as exc:
            raise _Refused("refused", "request: the sealed request does not open", exc) from exc
        self._remember(request_id)
        t1 = time.perf_counter()
        try:
            x = prepare(image, model.preprocess, self._max_pixels)  # (1, 3, H, W) float32
        except ImageError as exc:
            # Only the client learns why (sealed); the host sees an ordinary RESULT.
            log("request: image refused by the decoder (reason sealed to the client)")
            message = f"image refused: {exc}"[:MAX_ERROR_CHARS]
            self._answer(frame.tag, request_id, client_public, k, {"error": message}, {})
            return None
        t2 = time.perf_counter()
        stages = {"open_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3}
        return _Pending(request_id, client_public, k, t0, stages), x

    def _on_ir2(self, frame: Frame) -> None:
        pending = self._pending.pop(frame.tag, None)
        model = self._model
        if model is not None and model.tail is None:
            raise _Refused("refused", "ir2: the whole model runs here, no IR2 is taken")
        if pending is None or model is None or model.tail is None:
            raise _Refused("refused", "ir2: no request waits for this tag")
        self._refuse_if_tripped("ir2")
        t0 = time.perf_counter()
        verifier = self._verifier
        try:
            if verifier is None:  # the manifest says "unverified" (covered by the model id)
                ir2 = tensor_from_frame(frame, model.ir2_shape)  # (1, C, H, W) as the Tail expects
                sent: list[np.ndarray] = []
            else:
                ir2, *sent = tensors_from_frame(frame, [model.ir2_shape, *verifier.sent_shapes])
        except EnclaveError as exc:
            raise _Refused("refused", "ir2: dtype, shape or size is wrong", exc) from exc
        if not np.isfinite(ir2).all():
            raise _Refused("refused", "ir2: contains NaN or infinity")
        if verifier is not None and pending.ir1 is not None:
            try:
                verifier.check(pending.ir1, ir2, sent)
            except CheckFailed as exc:
                self._check_failures += 1
                raise _Refused(
                    "backnet_check_failed",
                    f"ir2: BackNet check failed at {exc.step} ({self._check_failures} of at most "
                    f"{getattr(self._need_manifest().backnet, 'max_failures', 0)})",
                ) from exc
            pending.stages["verify_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
        stages = {k: v for k, v in pending.stages.items() if k == "verify_ms"}
        scores = model.tail(ir2)[0]  # (num_classes,)
        stages["tail_ms"] = (time.perf_counter() - t0) * 1e3
        self._finish(frame.tag, pending, scores, stages)

    def _finish(self, tag: int, pending: _Pending, scores: np.ndarray, stages: dict[str, float]) -> None:
        """Top-k of one image's scores (num_classes,), sealed to its client."""
        model = self._model
        if model is None:  # unreachable: a pending request had a model
            raise _Refused("not_provisioned", "answer: no model key yet")
        if not np.isfinite(scores).all():
            raise _Refused("refused", "answer: the model produced non-finite scores")
        predictions = top_k(
            scores, model.labels, pending.k, already_probabilities=self._manifest_output() == "probabilities"
        )
        self._answer(
            tag,
            pending.request_id,
            pending.client_public,
            pending.k,
            {"predictions": [p.to_dict() for p in predictions]},
            stages,
        )

    def _answer(
        self,
        tag: int,
        request_id: str,
        client_public: bytes,
        k: int,
        document: dict[str, Any],
        stages: dict[str, float],
    ) -> None:
        """Seal *document* to the client, padded with JSON whitespace to a size that depends
        on the model and k only: its length must not tell the host the label."""
        manifest = self._need_manifest()
        model = self._model
        if model is None:
            raise _Refused("not_provisioned", "answer: no model key yet")
        t0 = time.perf_counter()
        plaintext = json.dumps(document, separators=(",", ":")).encode("utf-8")
        fixed, per_prediction = model.answer_bytes
        size = fixed + k * per_prediction
        if len(plaintext) > size:  # unreachable by construction of answer_bytes
            raise _Refused("internal", "answer: longer than its padded size")
        plaintext += b" " * (size - len(plaintext))
        try:
            sealed = seal(client_public, plaintext, context=response_context(manifest.model_id, request_id))
        except CryptoError as exc:
            raise _Refused("refused", "answer: the client's one-time key is unusable", exc) from exc
        stages = {**stages, "seal_ms": (time.perf_counter() - t0) * 1e3}
        self._send(MsgType.RESULT, tag, {"t": stages}, sealed)

    def _refuse_if_tripped(self, step: str) -> None:
        """After max_failures failed BackNet checks, refuse everything until restarted."""
        backnet = self._need_manifest().backnet
        if backnet is not None and backnet.verified and self._check_failures >= backnet.max_failures:
            raise _Refused("backnet_check_failed", f"{step}: refused, BackNet checks failed before")

    def _manifest_output(self) -> str:
        return self._need_manifest().output

    def _evict_stale(self) -> None:
        """Forget requests whose IR2 never came (the host gave up on them), so that an
        abandoned request cannot hold a slot for ever."""
        limit = time.perf_counter() - PENDING_TTL_S
        for tag in [t for t, p in self._pending.items() if p.started < limit]:
            del self._pending[tag]

    def _remember(self, request_id: str) -> None:
        self._seen[request_id] = None
        if len(self._seen) > REPLAY_WINDOW:
            self._seen.popitem(last=False)


def _answer_sizes(labels: list[str]) -> tuple[int, int]:
    """Padded answer size as (fixed bytes, bytes per prediction), from the longest label.

    A prediction is ``{"index":i,"label":"...","prob":p},``: the label as JSON (escapes
    included), an index of at most 6 digits and a float of at most 24 characters. The fixed
    part holds the envelope or an error message of at most `MAX_ERROR_CHARS` characters.
    """
    longest = max(len(json.dumps(label)) for label in labels)
    per_prediction = len('{"index":,"label":,"prob":},') + 6 + longest + 24
    return 6 * MAX_ERROR_CHARS + 64, per_prediction  # 6: a \uXXXX escape per character


def _seal_label(model_id: str) -> str:
    return f"infenclave/model-key/v1/{model_id}"


def _read(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path.name} is over the size limit")
    return data
