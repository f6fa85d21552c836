"""Every cryptographic primitive infenclave uses, in one small module.

Why one module: a reviewer should be able to read, in one place, which primitives run on
secrets, with which parameters and which limits. Everything here comes from `cryptography`
(pyca); nothing is home-made.

- Messages to a key holder (images to the enclave, model keys to an attested enclave,
  results back to a client) use HPKE, RFC 9180, single-shot base mode, suite
  DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM. The caller's *context* (model id,
  request id, ...) is passed as HPKE ``info``, so it enters the key schedule: a ciphertext
  made for one context cannot be opened under another (no replay into another request/model).
- Data at rest (bundle weights, sealed state) uses AES-256-GCM with a random 96-bit nonce
  prepended. Random nonces are safe for far fewer than 2**32 messages per key, which is the
  case for bundle and sealing keys (a handful of blobs each).
- Key derivation is HKDF-SHA256; the simulated TEE signs its evidence with Ed25519.
- Per-installation secrets live in files created once, mode 0600, and are refused when the
  file is readable by others.

Every refusal is a `CryptoError` that names no secret and keeps the library's exception as
``__cause__`` for the log. Sizes are bounded by the named constants below, checked before any
work is done.
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from infenclave.errors import CryptoError

__all__ = [
    "AEAD_KEY_SIZE",
    "AEAD_NONCE_SIZE",
    "AEAD_OVERHEAD",
    "AEAD_TAG_SIZE",
    "ED25519_KEY_SIZE",
    "ED25519_SIGNATURE_SIZE",
    "HPKE_ENC_SIZE",
    "HPKE_OVERHEAD",
    "MAX_AEAD_PLAINTEXT",
    "MAX_CONTEXT_PART",
    "MAX_CONTEXT_SIZE",
    "MAX_KEY_FILE_SIZE",
    "MAX_SEALED_PLAINTEXT",
    "X25519_KEY_SIZE",
    "aead_decrypt",
    "aead_encrypt",
    "context",
    "derive_key",
    "ed25519_public_key",
    "ed25519_sign",
    "ed25519_verify",
    "generate_aead_key",
    "generate_keypair",
    "load_or_create_key_file",
    "open_sealed",
    "public_key_bytes",
    "seal",
]

# --- parameters and limits -------------------------------------------------------------

#: The one HPKE suite (RFC 9180 ids: KEM 0x0020, KDF 0x0001, AEAD 0x0002).
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

X25519_KEY_SIZE = 32  # raw X25519 public key (RFC 7748)
HPKE_ENC_SIZE = 32  # encapsulated key of DHKEM(X25519), RFC 9180 section 7.1 (Nenc)
AEAD_KEY_SIZE = 32  # AES-256
AEAD_NONCE_SIZE = 12  # 96-bit GCM nonce (NIST SP 800-38D recommended length)
AEAD_TAG_SIZE = 16  # full 128-bit GCM tag, never truncated
HPKE_OVERHEAD = HPKE_ENC_SIZE + AEAD_TAG_SIZE
AEAD_OVERHEAD = AEAD_NONCE_SIZE + AEAD_TAG_SIZE
ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64

#: Largest HPKE message: a compressed image, a model key, a result. Bigger is refused
#: before any work, so a peer cannot make the enclave allocate or decrypt without bound.
MAX_SEALED_PLAINTEXT = 32 * 1024 * 1024
#: Largest blob at rest: FrontNet/Tail weights of the models we target are a few MiB.
MAX_AEAD_PLAINTEXT = 512 * 1024 * 1024
#: Context strings are identifiers (domain tag, model id, request id), not payloads.
MAX_CONTEXT_PART = 256
MAX_CONTEXT_SIZE = 1024
#: Key files hold one raw key; anything larger is not ours.
MAX_KEY_FILE_SIZE = 64


# --- context strings ---------------------------------------------------------------------


def context(*parts: bytes | str) -> bytes:
    """Build an unambiguous context string from *parts*.

    Each part (``str`` is UTF-8 encoded) is written as a 2-byte big-endian length followed by
    its bytes, after a 1-byte count of parts. Plain concatenation with a separator would let
    ``("a|b", "c")`` and ``("a", "b|c")`` collide; a length prefix cannot. Use a versioned
    domain tag as the first part, e.g. ``context(b"infenclave/request/v1", model_id, request_id)``.
    """
    if not parts:
        raise CryptoError("a context needs at least a domain tag")
    if len(parts) > 255:
        raise CryptoError("too many context parts")
    out = bytearray([len(parts)])
    for part in parts:
        if isinstance(part, str):
            raw = part.encode("utf-8")
        elif isinstance(part, (bytes, bytearray, memoryview)):
            raw = bytes(part)
        else:
            raise TypeError(f"context parts are bytes or str, not {type(part).__name__}")
        if len(raw) > MAX_CONTEXT_PART:
            raise CryptoError(f"context part longer than {MAX_CONTEXT_PART} bytes")
        out += struct.pack(">H", len(raw)) + raw
    if len(out) > MAX_CONTEXT_SIZE:
        raise CryptoError(f"context longer than {MAX_CONTEXT_SIZE} bytes")
    return bytes(out)


def _check_context(ctx: bytes) -> None:
    # An empty context would silently drop the replay protection the caller relies on.
    if not isinstance(ctx, (bytes, bytearray)):
        raise TypeError("context must be bytes")
    if not ctx:
        raise CryptoError("an empty context binds nothing; build one with context()")
    if len(ctx) > MAX_CONTEXT_SIZE:
        raise CryptoError(f"context longer than {MAX_CONTEXT_SIZE} bytes")


# --- HPKE --------------------------------------------------------------------------------


def generate_keypair() -> tuple[x25519.X25519PrivateKey, bytes]:
    """Return a fresh X25519 private key and its 32-byte raw public key (for evidence binding)."""
    private_key = x25519.X25519PrivateKey.generate()
    return private_key, public_key_bytes(private_key)


def public_key_bytes(private_key: x25519.X25519PrivateKey) -> bytes:
    """Return the raw 32-byte public key of *private_key*, the form that evidence binds."""
    return private_key.public_key().public_bytes_raw()


def seal(recipient_public: bytes, plaintext: bytes, *, context: bytes) -> bytes:
    """HPKE-encrypt *plaintext* to *recipient_public*, bound to *context*.

    Returns ``enc || ciphertext || tag`` (``HPKE_OVERHEAD`` bytes more than the plaintext).
    A fresh ephemeral key is used for every call, so sealing the same plaintext twice gives
    unrelated ciphertexts.
    """
    _check_context(context)
    if len(plaintext) > MAX_SEALED_PLAINTEXT:
        raise CryptoError(f"plaintext larger than {MAX_SEALED_PLAINTEXT} bytes")
    if len(recipient_public) != X25519_KEY_SIZE:
        raise CryptoError(f"recipient public key must be {X25519_KEY_SIZE} bytes")
    try:
        public_key = x25519.X25519PublicKey.from_public_bytes(bytes(recipient_public))
        return _SUITE.encrypt(bytes(plaintext), public_key, info=bytes(context))
    except ValueError as exc:
        # A low-order point (e.g. all zeros) gives an all-zero shared secret; OpenSSL
        # refuses it, as RFC 9180 section 7.1.4 requires.
        raise CryptoError("recipient public key refused") from exc


def open_sealed(
    private_key: x25519.X25519PrivateKey, ciphertext: bytes | bytearray | memoryview, *, context: bytes
) -> bytes:
    """Open an HPKE ciphertext made by `seal` for *private_key* under the same *context*.

    Any failure (wrong key, wrong context, a flipped bit, truncation) raises one opaque
    `CryptoError`, so a peer learns nothing about which check failed; the cause is chained.
    """
    _check_context(context)
    if len(ciphertext) < HPKE_OVERHEAD:
        raise CryptoError("sealed message could not be opened")
    if len(ciphertext) > MAX_SEALED_PLAINTEXT + HPKE_OVERHEAD:
        raise CryptoError("sealed message larger than the limit")
    try:
        return _SUITE.decrypt(bytes(ciphertext), private_key, info=bytes(context))
    except (InvalidTag, ValueError) as exc:
        raise CryptoError("sealed message could not be opened") from exc


# --- AEAD at rest ---------------------------------------------------------------------------


def generate_aead_key() -> bytes:
    """Return a fresh random 32-byte AES-256-GCM key from the OS CSPRNG."""
    return os.urandom(AEAD_KEY_SIZE)


def _aesgcm(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != AEAD_KEY_SIZE:
        # AESGCM would also accept 16/24-byte keys; we want exactly AES-256.
        raise CryptoError(f"AEAD key must be {AEAD_KEY_SIZE} bytes")
    return AESGCM(bytes(key))


def aead_encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encrypt; returns ``nonce(12) || ciphertext || tag(16)``.

    The nonce is random per call. *aad* should be a `context` string naming what the blob is
    (bundle id, partition, label), so that a blob cannot be swapped for another one.
    """
    cipher = _aesgcm(key)
    if len(plaintext) > MAX_AEAD_PLAINTEXT:
        raise CryptoError(f"plaintext larger than {MAX_AEAD_PLAINTEXT} bytes")
    nonce = os.urandom(AEAD_NONCE_SIZE)
    return nonce + cipher.encrypt(nonce, bytes(plaintext), bytes(aad))


def aead_decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Open a blob made by `aead_encrypt` with the same *key* and *aad*; `CryptoError` otherwise."""
    cipher = _aesgcm(key)
    if len(blob) < AEAD_OVERHEAD:
        raise CryptoError("encrypted blob could not be opened")
    if len(blob) > MAX_AEAD_PLAINTEXT + AEAD_OVERHEAD:
        raise CryptoError("encrypted blob larger than the limit")
    nonce, body = bytes(blob[:AEAD_NONCE_SIZE]), bytes(blob[AEAD_NONCE_SIZE:])
    try:
        return cipher.decrypt(nonce, body, bytes(aad))
    except InvalidTag as exc:
        raise CryptoError("encrypted blob could not be opened") from exc


# --- key derivation -------------------------------------------------------------------------


def derive_key(secret: bytes, *, salt: bytes, info: bytes, length: int = AEAD_KEY_SIZE) -> bytes:
    """HKDF-SHA256 (RFC 5869): derive a *length*-byte key from *secret* for the purpose *info*.

    Distinct *info* strings give independent keys, so one installation secret can serve
    several purposes without one key ever being used for two.
    """
    if len(secret) < 16:
        raise CryptoError("key derivation input shorter than 16 bytes")
    if not 16 <= length <= 64:
        raise CryptoError("derived key length must be 16..64 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=bytes(salt), info=bytes(info)).derive(bytes(secret))


# --- Ed25519 (simulation evidence) -------------------------------------------------------


def ed25519_public_key(private_raw: bytes) -> bytes:
    """Return the raw 32-byte Ed25519 public key for the raw 32-byte private key."""
    return _ed25519_private(private_raw).public_key().public_bytes_raw()


def ed25519_sign(private_raw: bytes, message: bytes) -> bytes:
    """Sign *message* with the raw 32-byte Ed25519 private key; returns a 64-byte signature."""
    return _ed25519_private(private_raw).sign(bytes(message))


def ed25519_verify(public_raw: bytes, signature: bytes, message: bytes) -> None:
    """Raise `CryptoError` unless *signature* is *public_raw*'s Ed25519 signature of *message*.

    The enclave checks the owner's signature over a bundle manifest with it.
    """
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes(public_raw)).verify(bytes(signature), bytes(message))
    except (ValueError, InvalidSignature) as exc:
        raise CryptoError("Ed25519 signature does not verify") from exc


def _ed25519_private(private_raw: bytes) -> ed25519.Ed25519PrivateKey:
    if len(private_raw) != ED25519_KEY_SIZE:
        raise CryptoError(f"Ed25519 private key must be {ED25519_KEY_SIZE} bytes")
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(private_raw))


# --- per-installation secrets on disk ---------------------------------------------------------


def load_or_create_key_file(path: Path, size: int) -> bytes:
    """Return the *size*-byte secret stored at *path*, creating it (mode 0600) on first use.

    Why this shape: a per-installation secret must survive restarts, be created exactly
    once even when two processes start together, and never be readable by another user.
    Creation writes a private temporary file in the same directory and hard-links it into
    place (atomic, fails if the name exists), so a reader never sees a half-written key.
    Loading refuses (fail closed) a symlink, a non-regular file, a file owned by another
    user, a file with any group/other permission bit, or a file of the wrong size.
    """
    if not 16 <= size <= MAX_KEY_FILE_SIZE:
        raise CryptoError(f"key file size must be 16..{MAX_KEY_FILE_SIZE} bytes")
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.path.lexists(path):
        _create_key_file(path, size)
    return _read_key_file(path, size)


def _create_key_file(path: Path, size: int) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-key-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(size))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            pass  # another process won the race; its key is the installation's key
    finally:
        os.unlink(tmp_name)


def _read_key_file(path: Path, size: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CryptoError(f"key file {path} cannot be opened") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CryptoError(f"key file {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise CryptoError(f"key file {path} is owned by another user")
        if info.st_mode & 0o077:
            raise CryptoError(f"key file {path} is accessible to group/others (want mode 0600)")
        if info.st_size != size:
            raise CryptoError(f"key file {path} has the wrong size")
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    if len(data) != size:
        raise CryptoError(f"key file {path} has the wrong size")
    return data
