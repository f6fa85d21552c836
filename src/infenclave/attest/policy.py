"""The client's verification policy: which TEEs, which measurements, which TCB states it trusts.

A policy is required to accept evidence, and there is no policy that accepts everything:
loading refuses unknown keys, wrong types, a policy with no accepted TEE or no measurement,
and a TEE type accepted without a measurement to match it. The one dangerous switch,
accepting simulated evidence, carries the danger in its code name
(`unsafe_allow_simulation`) and the verifier logs a warning whenever it is used.

File format (JSON, or YAML with the same keys)::

    {
      "tee_types": ["sgx"],
      "measurements": {"mrenclave": ["<64 hex>"], "mrsigner": ["<64 hex>"]},
      "allow_debug": false,
      "tcb_statuses": ["UpToDate"],
      "allow_simulation": false,
      "max_evidence_age_s": 300,
      "sim_signers": null,
      "model_ids": ["<64 hex: SHA-256 of the bundle manifest>"],
      "model_signers": ["<64 hex: the owner's Ed25519 public key>"],
      "allow_unverified_backnet": false,
      "snp_vmpls": null
    }

Confidential VMs are pinned by what covers the program, not only by the firmware: a policy
accepting ``tdx`` must list ``mrtd`` *and* ``rtmr0``..``rtmr3`` (the measured-boot chain:
firmware configuration, boot loader and kernel, command line and initrd, run time); one
accepting ``sev-snp`` must list ``snp_measurement`` (the launch digest), ``snp_host_data``
(the 32 bytes the host fixed at launch) and ``snp_vmpls`` (the VM privilege levels the
report may come from, 0..3). Only a measured-boot image whose initrd or root holds the
enclave program makes these values cover it (docs/serving.md).

Which *model* the enclave serves is part of what a client trusts: evidence binds the model id
(`infenclave.protocol.binding`), and a client (SDK and CLI) refuses a policy that names
neither `model_ids` (exact releases) nor `model_signers` (any manifest the owner signed):
without one, a host could serve a bundle of its own making and read the images.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from infenclave.errors import PolicyError, UsageError
from infenclave.protocol.files import read_bounded
from infenclave.protocol.strict_json import loads_object

__all__ = [
    "KNOWN_TCB_STATUSES",
    "MEASUREMENT_BYTES",
    "MEASUREMENTS_FOR_TEE",
    "TEE_TYPES",
    "Measurements",
    "Policy",
    "load_policy",
]

#: TEE types a policy may accept; the same names tag `Evidence.tee`.
TEE_TYPES: tuple[str, ...] = ("sgx", "tdx", "sev-snp", "simulated")

#: Which measurement lists apply to which TEE type.
MEASUREMENTS_FOR_TEE: Mapping[str, tuple[str, ...]] = {
    "sgx": ("mrenclave", "mrsigner"),
    "tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"),
    "sev-snp": ("snp_measurement", "snp_host_data"),
    "simulated": ("sim",),
}

#: Digest sizes: SGX MRENCLAVE/MRSIGNER are SHA-256, TDX MRTD and SNP MEASUREMENT SHA-384.
MEASUREMENT_BYTES: Mapping[str, int] = {
    "mrenclave": 32,
    "mrsigner": 32,
    "mrtd": 48,
    "rtmr0": 48,
    "rtmr1": 48,
    "rtmr2": 48,
    "rtmr3": 48,
    "snp_measurement": 48,
    "snp_host_data": 32,
    "sim": 32,
}

#: Intel TCB statuses (PCS API, TCB Info v3) a policy may accept. `Revoked` is absent on
#: purpose: no policy can accept a revoked platform.
KNOWN_TCB_STATUSES: tuple[str, ...] = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)

#: Policy files are a few hundred bytes; refuse to read something that is clearly not one.
MAX_POLICY_FILE_BYTES = 1024 * 1024
DEFAULT_MAX_EVIDENCE_AGE_S = 300

_TOP_LEVEL_KEYS = frozenset(
    {
        "tee_types",
        "measurements",
        "allow_debug",
        "tcb_statuses",
        "allow_simulation",
        "max_evidence_age_s",
        "sim_signers",
        "model_ids",
        "model_signers",
        "allow_unverified_backnet",
        "snp_vmpls",
    }
)
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Measurements:
    """Accepted measurement values per kind, lower-case hex; an empty tuple lists none."""

    mrenclave: tuple[str, ...] = ()
    mrsigner: tuple[str, ...] = ()
    mrtd: tuple[str, ...] = ()
    rtmr0: tuple[str, ...] = ()
    rtmr1: tuple[str, ...] = ()
    rtmr2: tuple[str, ...] = ()
    rtmr3: tuple[str, ...] = ()
    snp_measurement: tuple[str, ...] = ()
    snp_host_data: tuple[str, ...] = ()
    sim: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for kind, size in MEASUREMENT_BYTES.items():
            object.__setattr__(self, kind, _hex_tuple(f"measurements.{kind}", getattr(self, kind), size))

    def for_kind(self, kind: str) -> tuple[str, ...]:
        """Return the accepted values of one measurement kind (e.g. `mrenclave`)."""
        if kind not in MEASUREMENT_BYTES:
            raise PolicyError(f"unknown measurement kind {kind!r}")
        values: tuple[str, ...] = getattr(self, kind)
        return values

    def is_empty(self) -> bool:
        """True when no measurement of any kind is listed."""
        return not any(self.for_kind(kind) for kind in MEASUREMENT_BYTES)


@dataclass(frozen=True)
class Policy:
    """What the client accepts. Every instance is valid: `__post_init__` checks it all.

    Build it from a file with `load_policy`, from a parsed document with `from_mapping`, or
    directly in code; write it back with `to_json` (starter policies).
    """

    tee_types: tuple[str, ...]
    measurements: Measurements
    allow_debug: bool = False
    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    unsafe_allow_simulation: bool = False
    max_evidence_age_s: int = DEFAULT_MAX_EVIDENCE_AGE_S
    sim_signers: tuple[str, ...] | None = None
    model_ids: tuple[str, ...] = ()
    model_signers: tuple[str, ...] = ()
    allow_unverified_backnet: bool = False
    snp_vmpls: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Types first, so that the consistency checks below read well-formed values.
        object.__setattr__(self, "tee_types", _str_tuple("tee_types", self.tee_types))
        if not isinstance(self.measurements, Measurements):
            raise PolicyError("measurements: expected a Measurements value")
        _require_bool("allow_debug", self.allow_debug)
        _require_bool("allow_simulation", self.unsafe_allow_simulation)
        object.__setattr__(self, "tcb_statuses", _str_tuple("tcb_statuses", self.tcb_statuses))
        if isinstance(self.max_evidence_age_s, bool) or not isinstance(self.max_evidence_age_s, int):
            raise PolicyError("max_evidence_age_s: expected an integer number of seconds")
        if self.sim_signers is not None:
            object.__setattr__(self, "sim_signers", _hex_tuple("sim_signers", self.sim_signers, 32))
        object.__setattr__(self, "model_ids", _hex_tuple("model_ids", self.model_ids, 32))
        object.__setattr__(self, "model_signers", _hex_tuple("model_signers", self.model_signers, 32))
        _require_bool("allow_unverified_backnet", self.allow_unverified_backnet)
        if self.snp_vmpls is not None:
            vmpls = tuple(self.snp_vmpls) if isinstance(self.snp_vmpls, (list, tuple)) else None
            if not vmpls or any(isinstance(v, bool) or v not in (0, 1, 2, 3) for v in vmpls):
                raise PolicyError("snp_vmpls: expected a non-empty list of VMPLs 0..3")
            object.__setattr__(self, "snp_vmpls", vmpls)

        # Values and consistency.
        if not self.tee_types:
            raise PolicyError("tee_types: the policy accepts no TEE type (empty policy)")
        for tee in self.tee_types:
            if tee not in TEE_TYPES:
                raise PolicyError(f"tee_types: unknown TEE type {tee!r} (known: {_list(TEE_TYPES)})")
        _no_duplicates("tee_types", self.tee_types)
        if self.measurements.is_empty():
            raise PolicyError("measurements: the policy lists no measurement (empty policy)")
        for tee in self.tee_types:
            kinds = MEASUREMENTS_FOR_TEE[tee]
            if not any(self.measurements.for_kind(kind) for kind in kinds):
                raise PolicyError(
                    f"measurements: tee_types accepts {tee!r} but lists no "
                    f"{' or '.join(kinds)}: such evidence could never match"
                )
        for tee, kinds in MEASUREMENTS_FOR_TEE.items():
            for kind in kinds:
                if self.measurements.for_kind(kind) and tee not in self.tee_types:
                    raise PolicyError(f"measurements.{kind}: listed, but tee_types does not accept {tee!r}")
        # A confidential VM's firmware digest alone says nothing about the program it runs.
        for tee in ("tdx", "sev-snp"):
            missing = [k for k in MEASUREMENTS_FOR_TEE[tee] if not self.measurements.for_kind(k)]
            if tee in self.tee_types and missing:
                raise PolicyError(
                    f"measurements: tee_types accepts {tee!r}, which must pin every one of "
                    f"{', '.join(MEASUREMENTS_FOR_TEE[tee])} (missing: {', '.join(missing)}): "
                    "the firmware's digest alone does not cover the program"
                )
        if ("sev-snp" in self.tee_types) != (self.snp_vmpls is not None):
            raise PolicyError("snp_vmpls: required exactly when tee_types accepts 'sev-snp'")
        if not self.tcb_statuses:
            raise PolicyError("tcb_statuses: at least one TCB status must be accepted")
        for status in self.tcb_statuses:
            if status not in KNOWN_TCB_STATUSES:
                raise PolicyError(
                    f"tcb_statuses: {status!r} is not an acceptable TCB status "
                    f"(known: {_list(KNOWN_TCB_STATUSES)}; Revoked can never be accepted)"
                )
        _no_duplicates("tcb_statuses", self.tcb_statuses)
        # Listing 'simulated' without allow_simulation is a valid release policy: it pins the
        # sim measurement, and the verifier still refuses simulated evidence unless the client
        # explicitly allows simulation (`--allow-simulation`, with a warning on every run).
        if self.unsafe_allow_simulation and "simulated" not in self.tee_types:
            raise PolicyError("allow_simulation: true, but tee_types does not list 'simulated'")
        if self.max_evidence_age_s <= 0:
            raise PolicyError("max_evidence_age_s: must be a positive number of seconds")
        if self.sim_signers is not None:
            if not self.sim_signers:
                raise PolicyError("sim_signers: an empty list accepts no signer; omit it instead")
            if "simulated" not in self.tee_types:
                raise PolicyError("sim_signers: listed, but tee_types does not accept 'simulated'")

    @property
    def names_a_model(self) -> bool:
        """True when the policy pins which model may be served (ids or owner signers)."""
        return bool(self.model_ids or self.model_signers)

    @property
    def unsafe_allows_simulation(self) -> bool:
        """True when simulated (unprotected) evidence may be accepted. Never in production."""
        return self.unsafe_allow_simulation

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any]) -> Policy:
        """Build a policy from a parsed JSON/YAML document, refusing unknown keys."""
        if not isinstance(document, Mapping):
            raise PolicyError("policy: expected a mapping (JSON object) at the top level")
        unknown = sorted(str(key) for key in document if key not in _TOP_LEVEL_KEYS)
        if unknown:
            raise PolicyError(f"policy: unknown key(s) {', '.join(unknown)} (known: {_list(sorted(_TOP_LEVEL_KEYS))})")
        for required in ("tee_types", "measurements"):
            if required not in document:
                raise PolicyError(f"{required}: missing (empty policy)")
        raw_measurements = document["measurements"]
        if not isinstance(raw_measurements, Mapping):
            raise PolicyError("measurements: expected a mapping of measurement kind to list")
        unknown = sorted(str(key) for key in raw_measurements if key not in MEASUREMENT_BYTES)
        if unknown:
            raise PolicyError(f"measurements: unknown kind(s) {', '.join(unknown)} (known: {_list(MEASUREMENT_BYTES)})")
        measurements = Measurements(
            **{
                kind: _list_field(f"measurements.{kind}", value)
                for kind, value in raw_measurements.items()
                if value is not None
            }
        )
        sim_signers = document.get("sim_signers")
        return cls(
            tee_types=_list_field("tee_types", document["tee_types"]),
            measurements=measurements,
            allow_debug=document.get("allow_debug", False),
            tcb_statuses=_list_field("tcb_statuses", document.get("tcb_statuses", ["UpToDate"])),
            unsafe_allow_simulation=document.get("allow_simulation", False),
            max_evidence_age_s=document.get("max_evidence_age_s", DEFAULT_MAX_EVIDENCE_AGE_S),
            sim_signers=None if sim_signers is None else _list_field("sim_signers", sim_signers),
            model_ids=_list_field("model_ids", document.get("model_ids") or []),
            model_signers=_list_field("model_signers", document.get("model_signers") or []),
            allow_unverified_backnet=document.get("allow_unverified_backnet", False),
            snp_vmpls=None if document.get("snp_vmpls") is None else _list_field("snp_vmpls", document["snp_vmpls"]),
        )

    def to_mapping(self) -> dict[str, Any]:
        """Return the file form of this policy (the inverse of `from_mapping`)."""
        return {
            "tee_types": list(self.tee_types),
            "measurements": {
                field.name: list(getattr(self.measurements, field.name))
                for field in fields(Measurements)
                if getattr(self.measurements, field.name)
            },
            "allow_debug": self.allow_debug,
            "tcb_statuses": list(self.tcb_statuses),
            "allow_simulation": self.unsafe_allow_simulation,
            "max_evidence_age_s": self.max_evidence_age_s,
            "sim_signers": None if self.sim_signers is None else list(self.sim_signers),
            "model_ids": list(self.model_ids),
            "model_signers": list(self.model_signers),
            "allow_unverified_backnet": self.allow_unverified_backnet,
            "snp_vmpls": None if self.snp_vmpls is None else list(self.snp_vmpls),
        }

    def to_json(self) -> str:
        """Serialise to the JSON file format; `load_policy` reads it back to an equal policy."""
        return json.dumps(self.to_mapping(), indent=2) + "\n"


def load_policy(path: Path) -> Policy:
    """Load a policy from a `.json`, `.yaml` or `.yml` file (by extension; JSON otherwise)."""
    data = read_bounded(path, MAX_POLICY_FILE_BYTES, "policy file", UsageError, PolicyError)
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"policy file {path} is not UTF-8") from exc
        document: Any = _load_yaml(text, path)
    else:
        document = loads_object(data, f"policy file {path}", PolicyError)
    try:
        return Policy.from_mapping(document)
    except PolicyError as exc:
        raise PolicyError(f"policy file {path}: {exc}") from exc


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _construct_strict_mapping(loader: _StrictYamlLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise PolicyError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping)


def _load_yaml(text: str, path: Path) -> Any:
    """Parse YAML with the safe loader only (no object construction), duplicates refused."""
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except PolicyError as exc:
        raise PolicyError(f"policy file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {path} is not valid YAML: {exc}") from exc


def _list_field(key: str, value: Any) -> tuple[Any, ...]:
    """Accept a JSON list only (a bare string would iterate into characters)."""
    if not isinstance(value, list):
        raise PolicyError(f"{key}: expected a list, got {type(value).__name__}")
    return tuple(value)


def _str_tuple(key: str, values: Iterable[Any]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, (tuple, list)):
        raise PolicyError(f"{key}: expected a list of strings")
    for value in values:
        if not isinstance(value, str):
            raise PolicyError(f"{key}: expected strings, got {type(value).__name__} {value!r}")
    return tuple(values)


def _hex_tuple(key: str, values: Iterable[Any], size: int) -> tuple[str, ...]:
    """Lower-case and check a list of hex digests of `size` bytes."""
    result = []
    for value in _str_tuple(key, values):
        lowered = value.lower()
        if _HEX.fullmatch(lowered) is None:
            raise PolicyError(f"{key}: {value!r} is not a hex string")
        if len(lowered) != 2 * size:
            raise PolicyError(
                f"{key}: {value!r} is {len(lowered) / 2:g} bytes, expected {size} ({2 * size} hex digits)"
            )
        result.append(lowered)
    _no_duplicates(key, result)
    return tuple(result)


def _require_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise PolicyError(f"{key}: expected true or false, got {value!r}")


def _no_duplicates(key: str, values: Iterable[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise PolicyError(f"{key}: {value!r} is listed twice")
        seen.add(value)


def _list(values: Iterable[str]) -> str:
    return ", ".join(values)
