"""What verified evidence says: the result of `verify`, immutable and printable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from infenclave.protocol.binding import REPORT_DATA_BYTES

__all__ = ["Claims", "REPORT_DATA_BYTES"]


@dataclass(frozen=True)
class Claims:
    """Claims of evidence that passed the cryptographic checks (and the policy, if one was given).

    - `measurements`: name -> value, lower-case hex for digests (`mrenclave`, `mrsigner`;
      `mrtd`, `rtmr0`..`rtmr3`; `measurement` for SEV-SNP and simulated evidence) and
      decimal for the SGX numbers `isv_prod_id` and `isv_svn`.
    - `tcb_status`: Intel's TCB status from the collateral; None where there is none
      (SEV-SNP: see `details["reported_tcb"]`; simulated; DCAP quote checked without
      collateral, which no policy accepts).
    - `details`: further facts for people and logs (collateral state, TCB components, signer).
    """

    tee: str
    measurements: Mapping[str, str]
    debug: bool
    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    report_data: bytes
    details: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views: a caller cannot edit the claims after verification.
        object.__setattr__(self, "measurements", MappingProxyType(dict(self.measurements)))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))
        object.__setattr__(self, "advisory_ids", tuple(self.advisory_ids))
        if len(self.report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report_data must be {REPORT_DATA_BYTES} bytes")

    def to_json_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (bytes as lower-case hex)."""
        return {
            "tee": self.tee,
            "measurements": dict(self.measurements),
            "debug": self.debug,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "report_data": self.report_data.hex(),
            "details": dict(self.details),
        }
