"""The real attestation evidence ships with the tests, byte for byte as published.

The verifier tests are only as good as their evidence: a file edited by accident (a line-ending
conversion, a truncated copy) would make "valid quote accepted" or "flipped byte refused" test
something else. `SHA256SUMS` pins every file; the README beside it gives provenance and licence.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

EVIDENCE = Path(__file__).resolve().parent / "data" / "evidence"


def test_every_evidence_file_matches_its_published_digest() -> None:
    listed = {}
    for line in (EVIDENCE / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = {
        p.relative_to(EVIDENCE).as_posix()
        for p in EVIDENCE.rglob("*")
        if p.is_file() and p.name not in ("SHA256SUMS", "README.md")
    }
    assert present == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((EVIDENCE / name).read_bytes()).hexdigest() == digest, name
