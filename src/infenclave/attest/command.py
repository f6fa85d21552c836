"""`infenclave attest`: verify an evidence file and say exactly why it is accepted or refused.

Exit codes: 0 accepted by the policy (or, without `--policy`, the cryptographic checks
passed); 1 refused (a signature, chain, collateral or policy check failed); bad input (a
missing or unreadable file, a malformed policy, evidence that is not evidence) raises an
`InfenclaveError`, which the CLI turns into one line and exit 2.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from infenclave.attest.claims import Claims
from infenclave.attest.evidence import load_evidence_file
from infenclave.attest.policy import load_policy
from infenclave.attest.verifier import PolicyRefusal, verify
from infenclave.errors import UsageError, VerificationError

__all__ = ["attest_command", "parse_at"]

EXIT_ACCEPTED = 0
EXIT_REFUSED = 1


def parse_at(at: str | None) -> datetime:
    """Parse `--at` (ISO-8601; `Z` or an offset; no zone means UTC), or return now in UTC."""
    if at is None:
        return datetime.now(timezone.utc)
    try:
        moment = datetime.fromisoformat(at.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise UsageError(
            f"--at {at!r} is not an ISO-8601 time (e.g. 2025-06-19T11:56:11Z)"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def attest_command(
    evidence: Path, collateral: Path | None, at: str | None, policy: Path | None, as_json: bool
) -> int:
    """Load, verify and report; return the exit code (0 accepted, 1 refused)."""
    now = parse_at(at)
    loaded_policy = load_policy(policy) if policy is not None else None
    loaded = load_evidence_file(evidence, collateral)

    claims: Claims | None
    reason: str | None = None
    try:
        claims = verify(loaded, loaded_policy, expected_report_data=None, now=now)
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
        "evidence": str(evidence),
        "policy": None if policy is None else str(policy),
        "verified_at": now.isoformat().replace("+00:00", "Z"),
        "claims": None if claims is None else claims.to_json_dict(),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(result, claims)
    return EXIT_REFUSED if reason is not None else EXIT_ACCEPTED


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
