"""`infenclave attest`: verify an evidence file and say exactly why it is accepted or refused.

EVIDENCE is one evidence file, or a server's saved ``GET /v1/attestation`` answer: then every
enclave worker's evidence is verified, and with ``--nonce`` (the nonce that answer was asked
with) each worker's report data must bind its public key, the model id and that nonce.

Exit codes (`infenclave.errors.ExitCode`): 0 accepted by the policy (or, without `--policy`,
the cryptographic checks passed); 3 refused (a signature, chain, collateral, binding or
policy check failed); bad input (a missing or unreadable file, a malformed policy, a bad
``--nonce``) raises an `InfenclaveError`, which the CLI turns into one line and exit 2.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from infenclave.attest.claims import Claims
from infenclave.attest.evidence import Evidence, load_evidence_file, read_attestation_answer
from infenclave.attest.policy import Policy, load_policy
from infenclave.attest.verifier import PolicyRefusal, verify
from infenclave.errors import ExitCode, UsageError, VerificationError

__all__ = ["attest_command", "parse_at"]

EXIT_ACCEPTED = ExitCode.OK
EXIT_REFUSED = ExitCode.REFUSED


def parse_at(at: str | None) -> datetime:
    """Parse `--at` (ISO-8601; `Z` or an offset; no zone means UTC), or return now in UTC."""
    if at is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(at.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"--at {at!r} is not an ISO-8601 time (e.g. 2025-06-19T11:56:11Z)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def attest_command(
    evidence: Path,
    collateral: Path | None,
    at: str | None,
    policy: Path | None,
    as_json: bool,
    nonce: str | None = None,
) -> int:
    """Load, verify and report; return the exit code (0 accepted, 3 refused)."""
    now = parse_at(at)
    loaded_policy = load_policy(policy) if policy is not None else None
    try:  # a file that is not evidence is bad input; refusals come from verifying it
        answer = read_attestation_answer(evidence)
        loaded = load_evidence_file(evidence, collateral) if answer is None else None
    except VerificationError as exc:
        raise UsageError(str(exc)) from exc
    if loaded is not None:
        if nonce is not None:
            raise UsageError("--nonce checks a saved /v1/attestation answer; EVIDENCE is a single evidence file")
        result, claims = _verify_one(str(evidence), loaded, loaded_policy, policy, None, now)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            _print_human(result, claims)
        return EXIT_REFUSED if result["reason"] is not None else EXIT_ACCEPTED
    assert answer is not None  # typing only: one of the two was read

    from infenclave.protocol.binding import expected_report_data

    if collateral is not None:
        raise UsageError("an attestation answer carries each worker's collateral in its envelope")
    nonce_bytes = _parse_nonce(nonce)
    model_refusal = _model_refusal(answer.model_id, loaded_policy)
    results = []
    for index, entry in enumerate(answer.enclaves):
        expected = None if nonce_bytes is None else expected_report_data(entry.public_key, nonce_bytes, answer.model_id)
        result, claims = _verify_one(
            f"{evidence} enclave {index} (key {entry.key_id[:16]}...)",
            entry.evidence,
            loaded_policy,
            policy,
            expected,
            now,
        )
        if model_refusal is not None and result["reason"] is None:
            result.update(verdict="refused", reason=model_refusal)
        result["public_key"] = entry.key_id
        result["report_data_checked"] = nonce_bytes is not None
        results.append((result, claims))
    refused = any(r["reason"] is not None for r, _ in results)
    verdict = "refused" if refused else results[0][0]["verdict"]
    if as_json:
        print(
            json.dumps({"verdict": verdict, "model_id": answer.model_id, "enclaves": [r for r, _ in results]}, indent=2)
        )
    else:
        for result, claims in results:
            _print_human(result, claims)
        if nonce_bytes is None:
            print(
                "note: without --nonce the report data (worker key, model id, nonce) was not "
                "checked: this shows what the workers are, not that they answered you"
            )
    return EXIT_REFUSED if refused else EXIT_ACCEPTED


def _verify_one(
    name: str,
    loaded: Evidence,
    loaded_policy: Policy | None,
    policy: Path | None,
    expected: bytes | None,
    now: datetime,
) -> tuple[dict[str, Any], Claims | None]:
    """Verify one evidence; the result document and the claims (None if unreadable)."""
    claims: Claims | None
    reason: str | None = None
    try:
        claims = verify(loaded, loaded_policy, expected_report_data=expected, now=now)
    except PolicyRefusal as exc:
        claims, reason = exc.claims, _reason(exc)
    except VerificationError as exc:
        claims, reason = None, _reason(exc)

    if reason is not None:
        verdict = "refused"
    elif loaded_policy is None:
        verdict = "verified-no-policy"
    else:
        verdict = "accepted"
    result: dict[str, Any] = {
        "verdict": verdict,
        "reason": reason,
        "evidence": name,
        "policy": None if policy is None else str(policy),
        "verified_at": now.isoformat().replace("+00:00", "Z"),
        "claims": None if claims is None else claims.to_json_dict(),
    }
    return result, claims


def _parse_nonce(nonce: str | None) -> bytes | None:
    if nonce is None:
        return None
    from infenclave.protocol.binding import MAX_NONCE_BYTES, MIN_NONCE_BYTES

    try:
        value = bytes.fromhex(nonce)
    except ValueError as exc:
        raise UsageError("--nonce must be hex") from exc
    if not MIN_NONCE_BYTES <= len(value) <= MAX_NONCE_BYTES:
        raise UsageError(f"--nonce must be {MIN_NONCE_BYTES}-{MAX_NONCE_BYTES} bytes")
    return value


def _model_refusal(model_id: str, policy: Policy | None) -> str | None:
    """A refusal when the policy names models by id only and not this one."""
    if policy is None or not policy.model_ids or policy.model_signers:
        return None
    if model_id in policy.model_ids:
        return None
    return f"the server serves model {model_id[:16]}..., which the policy does not name"


def _reason(exc: VerificationError) -> str:
    """The refusal message, plus the underlying cause where the message does not carry it."""
    message = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in message:
        message = f"{message} (cause: {type(cause).__name__}: {cause})"
    return message


def _print_human(result: dict[str, Any], claims: Claims | None) -> None:
    console = Console(highlight=False)
    if claims is not None:
        table = Table(title=f"{claims.tee} evidence ({result['evidence']})", show_lines=False)
        table.add_column("claim", style="bold")
        table.add_column("value", overflow="fold")
        table.add_row("tee", claims.tee)
        for name, value in claims.measurements.items():
            table.add_row(name, value)
        table.add_row("debug", "YES" if claims.debug else "no")
        table.add_row("tcb_status", claims.tcb_status or "-")
        table.add_row("advisory_ids", ", ".join(claims.advisory_ids) or "-")
        table.add_row("report_data", claims.report_data.hex())
        for name, value in claims.details.items():
            table.add_row(name, value)
        console.print(table)
    at = result["verified_at"]
    if result["verdict"] == "accepted":
        console.print(f"[green]ACCEPTED[/green] by policy {result['policy']} at {at}", markup=True)
    elif result["verdict"] == "verified-no-policy":
        console.print(
            f"[yellow]VERIFIED (cryptographic checks only)[/yellow] at {at}: no --policy was "
            "given, so nothing about measurements, debug or TCB status was decided; this "
            "is not acceptance.",
            markup=True,
        )
    else:
        console.print(f"[red]REFUSED[/red] at {at}: ", markup=True, end="")
        console.print(result["reason"], markup=False)
