"""infenclave.crypto: HPKE and AEAD round trips, every refusal, limits, key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519

from infenclave import crypto
from infenclave.crypto import (
    AEAD_OVERHEAD,
    HPKE_OVERHEAD,
    aead_decrypt,
    aead_encrypt,
    context,
    generate_aead_key,
    generate_keypair,
    open_sealed,
    seal,
)
from infenclave.errors import CryptoError, InfenclaveError

CTX = context(b"infenclave/request/v1", "lite0", b"req-1")


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# --- context --------------------------------------------------------------------------------


def test_context_is_unambiguous() -> None:
    assert context("a|b", "c") != context("a", "b|c")
    assert context(b"ab", b"") != context(b"a", b"b")
    assert context(b"x") != context(b"x", b"")
    assert context("m", "r") == context(b"m", b"r")  # str is UTF-8


def test_context_limits() -> None:
    with pytest.raises(CryptoError):
        context()
    with pytest.raises(CryptoError):
        context(b"x" * (crypto.MAX_CONTEXT_PART + 1))
    with pytest.raises(CryptoError):
        context(*([b"y" * crypto.MAX_CONTEXT_PART] * 5))
    with pytest.raises(TypeError):
        context(b"tag", 3)  # type: ignore[arg-type]


# --- HPKE -----------------------------------------------------------------------------------


def test_keypair_shape() -> None:
    private_key, public = generate_keypair()
    assert isinstance(private_key, x25519.X25519PrivateKey)
    assert len(public) == crypto.X25519_KEY_SIZE
    assert crypto.public_key_bytes(private_key) == public


@pytest.mark.parametrize("size", [0, 1, 1000, 300_000])
def test_seal_round_trip(size: int) -> None:
    private_key, public = generate_keypair()
    message = os.urandom(size)
    sealed = seal(public, message, context=CTX)
    assert len(sealed) == size + HPKE_OVERHEAD
    assert open_sealed(private_key, sealed, context=CTX) == message


def test_seal_is_randomised() -> None:
    _, public = generate_keypair()
    assert seal(public, b"same", context=CTX) != seal(public, b"same", context=CTX)


def test_open_refuses_other_context() -> None:
    private_key, public = generate_keypair()
    sealed = seal(public, b"image", context=CTX)
    for other in (
        context(b"infenclave/request/v1", "lite0", b"req-2"),  # replay into another request
        context(b"infenclave/request/v1", "lite1", b"req-1"),  # ... into another model
        context(b"infenclave/result/v1", "lite0", b"req-1"),  # ... into another direction
    ):
        with pytest.raises(CryptoError) as info:
            open_sealed(private_key, sealed, context=other)
        assert isinstance(info.value.__cause__, InvalidTag)


def test_open_refuses_other_key() -> None:
    _, public = generate_keypair()
    other_private, _ = generate_keypair()
    sealed = seal(public, b"image", context=CTX)
    with pytest.raises(CryptoError):
        open_sealed(other_private, sealed, context=CTX)


def test_open_refuses_every_tampered_byte() -> None:
    private_key, public = generate_keypair()
    sealed = seal(public, b"0123456789", context=CTX)
    for index in range(len(sealed)):  # enc, ciphertext and tag alike
        with pytest.raises(CryptoError):
            open_sealed(private_key, _flip(sealed, index), context=CTX)


def test_open_refuses_truncation_and_extension() -> None:
    private_key, public = generate_keypair()
    sealed = seal(public, b"image", context=CTX)
    for bad in (b"", sealed[: HPKE_OVERHEAD - 1], sealed[:-1], sealed + b"\x00"):
        with pytest.raises(CryptoError):
            open_sealed(private_key, bad, context=CTX)


def test_errors_are_opaque_and_rooted() -> None:
    private_key, public = generate_keypair()
    sealed = seal(public, b"secret image", context=CTX)
    with pytest.raises(InfenclaveError) as info:
        open_sealed(private_key, _flip(sealed, 40), context=CTX)
    assert str(info.value) == "sealed message could not be opened"


def test_seal_refuses_bad_recipients_and_empty_context() -> None:
    with pytest.raises(CryptoError):
        seal(b"\x01" * 31, b"x", context=CTX)
    with pytest.raises(CryptoError):
        seal(bytes(32), b"x", context=CTX)  # low-order point: all-zero shared secret
    _, public = generate_keypair()
    with pytest.raises(CryptoError):
        seal(public, b"x", context=b"")
    with pytest.raises(CryptoError):
        seal(public, b"x", context=b"c" * (crypto.MAX_CONTEXT_SIZE + 1))


def test_seal_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    private_key, public = generate_keypair()
    monkeypatch.setattr(crypto, "MAX_SEALED_PLAINTEXT", 100)
    sealed = seal(public, b"a" * 100, context=CTX)
    assert open_sealed(private_key, sealed, context=CTX) == b"a" * 100
    with pytest.raises(CryptoError):
        seal(public, b"a" * 101, context=CTX)
    with pytest.raises(CryptoError, match="larger than the limit"):
        open_sealed(private_key, b"\x00" * (100 + HPKE_OVERHEAD + 1), context=CTX)


# --- AEAD at rest -----------------------------------------------------------------------------


def test_aead_round_trip_and_layout() -> None:
    key = generate_aead_key()
    assert len(key) == crypto.AEAD_KEY_SIZE
    blob = aead_encrypt(key, b"weights", b"aad")
    assert len(blob) == len(b"weights") + AEAD_OVERHEAD
    assert aead_decrypt(key, blob, b"aad") == b"weights"
    assert aead_encrypt(key, b"weights", b"aad")[:12] != blob[:12]  # fresh nonce


def test_aead_refusals() -> None:
    key = generate_aead_key()
    blob = aead_encrypt(key, b"weights", b"aad")
    with pytest.raises(CryptoError):
        aead_decrypt(key, blob, b"other aad")
    with pytest.raises(CryptoError):
        aead_decrypt(generate_aead_key(), blob, b"aad")
    for index in range(len(blob)):
        with pytest.raises(CryptoError):
            aead_decrypt(key, _flip(blob, index), b"aad")
    with pytest.raises(CryptoError):
        aead_decrypt(key, blob[: AEAD_OVERHEAD - 1], b"aad")


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33])
def test_aead_key_length_checked(size: int) -> None:
    with pytest.raises(CryptoError):
        aead_encrypt(b"k" * size, b"x", b"")
    with pytest.raises(CryptoError):
        aead_decrypt(b"k" * size, b"x" * 40, b"")


def test_aead_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_aead_key()
    monkeypatch.setattr(crypto, "MAX_AEAD_PLAINTEXT", 10)
    aead_encrypt(key, b"x" * 10, b"")
    with pytest.raises(CryptoError):
        aead_encrypt(key, b"x" * 11, b"")
    with pytest.raises(CryptoError):
        aead_decrypt(key, b"x" * (10 + AEAD_OVERHEAD + 1), b"")


# --- KDF and signatures ------------------------------------------------------------------------


def test_derive_key_separates_purposes() -> None:
    secret = os.urandom(32)
    a = crypto.derive_key(secret, salt=b"s", info=b"a")
    assert len(a) == 32
    assert a == crypto.derive_key(secret, salt=b"s", info=b"a")
    assert a != crypto.derive_key(secret, salt=b"s", info=b"b")
    with pytest.raises(CryptoError):
        crypto.derive_key(b"short", salt=b"s", info=b"a")


def test_ed25519_sign_is_verifiable_by_pyca() -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    private_raw = os.urandom(32)
    public = Ed25519PublicKey.from_public_bytes(crypto.ed25519_public_key(private_raw))
    sig = crypto.ed25519_sign(private_raw, b"body")
    public.verify(sig, b"body")
    with pytest.raises(InvalidSignature):
        public.verify(sig, b"body!")
    with pytest.raises(InvalidSignature):
        public.verify(_flip(sig, 0), b"body")


# --- key files ---------------------------------------------------------------------------------


def test_key_file_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "k.key"
    first = crypto.load_or_create_key_file(path, 32)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.load_or_create_key_file(path, 32) == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["k.key"]  # no temp file left


def test_key_file_refusals(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    crypto.load_or_create_key_file(path, 32)
    path.chmod(0o640)
    with pytest.raises(CryptoError, match="group/others"):
        crypto.load_or_create_key_file(path, 32)
    path.chmod(0o600)
    with pytest.raises(CryptoError, match="wrong size"):
        crypto.load_or_create_key_file(path, 16)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(CryptoError):
        crypto.load_or_create_key_file(link, 32)
