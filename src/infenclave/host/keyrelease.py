"""The host's relay of attested key release (`serve --keyserver URL`); untrusted.

A worker that starts without the model key (fresh state, a new replica, a stored sealed key
that no longer opens, a confidential VM with no sealing key) gets it from the owner's key
server (`infenclave keyserver`) without the owner: the host fetches a challenge nonce, asks
the worker for evidence over it (an ordinary EVIDENCE frame binding the worker's key, the
model id and the nonce), forwards the evidence, and hands the answer, the model key sealed to
that worker, to the worker as an ordinary PROVISION frame. The host sees only the nonce, the
evidence and ciphertext. Messages: `infenclave.protocol.keyrelease`.
"""

from __future__ import annotations

import httpx

from infenclave.errors import ServerError, VerificationError
from infenclave.host.channel import EnclaveChannel
from infenclave.protocol.envelope import encode_envelope
from infenclave.protocol.frames import MsgType
from infenclave.protocol.keyrelease import (
    CHALLENGE_PATH,
    KEY_PATH,
    challenge_request,
    decode_challenge,
    decode_key_response,
    encode_key_request,
)

__all__ = ["KeyReleaseRefused", "fetch_sealed_model_key"]


class KeyReleaseRefused(ServerError):
    """The key server refused (403), rate-limited (429) or answered something unusable."""


async def fetch_sealed_model_key(
    url: str, channel: EnclaveChannel, public_key: bytes, model_id: str, *, timeout: float
) -> bytes:
    """Challenge, evidence, key request for the worker behind *channel*; returns the model key
    sealed to *public_key*, for a PROVISION frame."""
    from infenclave.host.enclave_pool import split_evidence

    base = url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout) as http:
        answer = await http.post(base + CHALLENGE_PATH, json=challenge_request(model_id))
        _check(answer, "challenge")
        try:
            nonce = decode_challenge(answer.content)
        except VerificationError as exc:
            raise KeyReleaseRefused("the key server's challenge is malformed") from exc
        frame = await channel.call(MsgType.EVIDENCE, {"nonce": nonce.hex()}, timeout=timeout)
        tee, raw, certificates = split_evidence(frame)
        envelope = encode_envelope(tee, raw, certificates=certificates)
        answer = await http.post(base + KEY_PATH, json=encode_key_request(model_id, nonce, public_key, envelope))
        _check(answer, "key request")
        try:
            return decode_key_response(answer.content)
        except VerificationError as exc:
            raise KeyReleaseRefused("the key server's answer is malformed") from exc


def _check(answer: httpx.Response, step: str) -> None:
    if answer.status_code != 200:
        raise KeyReleaseRefused(f"key server: {step} answered {answer.status_code} ({answer.text[:80]!r})")
