"""Small X.509 helpers shared by the DCAP and SEV-SNP verifiers."""

from __future__ import annotations

import warnings
from datetime import datetime

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from infenclave.errors import VerificationError

__all__ = ["check_validity", "load_pem_certificates", "load_der_certificate"]


def load_pem_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """Parse a PEM bundle (trailing NUL bytes, as DCAP quotes carry them, are ignored)."""
    try:
        with warnings.catch_warnings():
            # AMD VCEKs carry serial number 0, which cryptography 50 warns about; the
            # certificate is still checked in full by the caller.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_pem_x509_certificates(data.rstrip(b"\x00"))
    except ValueError as exc:
        raise VerificationError(f"{what}: not a PEM certificate bundle ({exc})") from exc


def load_der_certificate(data: bytes, what: str) -> x509.Certificate:
    """Parse one DER certificate."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise VerificationError(f"{what}: not a DER certificate ({exc})") from exc


def check_validity(certificate: x509.Certificate, now: datetime, name: str) -> None:
    """Refuse a certificate outside its validity period at the verification time `now`."""
    if now < certificate.not_valid_before_utc:
        raise VerificationError(
            f"{name} certificate is not valid before "
            f"{certificate.not_valid_before_utc.isoformat()} (verification time {now.isoformat()})"
        )
    if now > certificate.not_valid_after_utc:
        raise VerificationError(
            f"{name} certificate expired at "
            f"{certificate.not_valid_after_utc.isoformat()} (verification time {now.isoformat()})"
        )
