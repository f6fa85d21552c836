"""Fuzz every parser that reads attacker-chosen bytes, >= 100,000 inputs per target.

The targets, seeds and property are those of ``tests/test_fuzz_parsers.py`` (one
definition; the test suite runs a few hundred inputs per target): every input is parsed or
refused with `InfenclaveError`. Here a finding is *counted* instead of stopping the run: any
other exception (type, message, first 64 bytes of the input in hex, up to 5 kept per
target) or an input that takes longer than `SLOW_S`. Hypothesis generates the inputs
(generate phase only, no database), so a run is reproducible with ``--seed``.

    .venv/bin/python bench/fuzz.py                 # 100,000 per target, all targets
    .venv/bin/python bench/fuzz.py -n 2000 --only frame image_decoder

Writes ``bench/results/fuzz.json``: per target the inputs run, how many parsed and how
many were refused, findings, slowest input, wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from infenclave.errors import InfenclaveError  # noqa: E402
from test_fuzz_parsers import Target, mutated, targets  # noqa: E402

#: An input slower than this is a finding (a parser must refuse fast).
SLOW_S = 1.0
_KEEP = 5


def fuzz(target: Target, n: int, rng_seed: int) -> dict[str, object]:
    counts = {"inputs": 0, "parsed": 0, "refused": 0, "findings": 0}
    findings: list[dict[str, str]] = []
    slowest = 0.0

    @seed(rng_seed)
    @settings(
        max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @given(mutated(target.seeds))
    def run(data: bytes) -> None:
        nonlocal slowest
        counts["inputs"] += 1
        t0 = time.perf_counter()
        try:
            target.parse(data)
            counts["parsed"] += 1
        except InfenclaveError:
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - a finding, recorded and counted
            counts["findings"] += 1
            if len(findings) < _KEEP:
                findings.append(
                    {
                        "type": type(exc).__name__,
                        "message": str(exc)[:200],
                        "input_hex": data[:64].hex(),
                        "input_len": str(len(data)),
                    }
                )
        elapsed = time.perf_counter() - t0
        slowest = max(slowest, elapsed)
        if elapsed > SLOW_S:
            counts["findings"] += 1
            if len(findings) < _KEEP:
                findings.append(
                    {
                        "type": "slow",
                        "message": f"{elapsed:.2f} s",
                        "input_hex": data[:64].hex(),
                        "input_len": str(len(data)),
                    }
                )

    seeds_parsed = 0  # a seed the parser refuses means the run only scratches its surface
    for warm in (*target.seeds, b"", b"\x89PNG-not-really"):  # lazy imports (PIL plugins) once
        try:
            target.parse(warm)
            seeds_parsed += warm in target.seeds
        except Exception:  # noqa: BLE001 - warm-up only; the run counts
            pass
    t0 = time.perf_counter()
    run()
    return {
        **counts,
        "seeds": len(target.seeds),
        "seeds_parsed": seeds_parsed,
        "findings_kept": findings,
        "slowest_input_s": round(slowest, 4),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--only", nargs="*", help="target names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # PIL warns about corrupt EXIF/TIFF tags: expected here
    chosen = [t for t in targets() if not args.only or t.name in args.only]
    results: dict[str, dict[str, object]] = {}
    for target in chosen:
        results[target.name] = fuzz(target, args.n, args.seed)
        r = results[target.name]
        print(
            f"{target.name:18} {r['inputs']:>7} inputs  {r['parsed']:>6} parsed  "
            f"{r['refused']:>7} refused  {r['findings']} findings  {r['wall_s']} s",
            flush=True,
        )
        doc = _write(args, results)  # after each target: a long run that is cut keeps its figures
    return 1 if doc["total_findings"] else 0


def _write(args: argparse.Namespace, results: dict[str, dict[str, object]]) -> dict[str, object]:
    doc = {
        "command": "bench/fuzz.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "inputs_per_target_requested": args.n,
        "slow_threshold_s": SLOW_S,
        "python": platform.python_version(),
        "targets": results,
        "total_findings": sum(int(r["findings"]) for r in results.values()),  # type: ignore[call-overload]
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    sys.exit(main())
