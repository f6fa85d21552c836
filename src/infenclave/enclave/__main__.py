"""Entry point of the enclave program: ``python -m infenclave.enclave --tee sim ...``.

Start-up order matters, and is the reason this file exists:

1. ``--tee sim``: apply the process sandbox (`sandbox.apply_sandbox`) before numpy or
   onnxruntime start any thread and before any secret exists. Under Gramine the manifest
   is the sandbox, so this step is skipped there.
2. Register a code-less placeholder for the ``infenclave.attest`` package, so that
   importing ``infenclave.attest.sim_format`` does not run ``attest/__init__.py`` (which
   pulls in the client's verifier: dcap-qvl, X.509 parsing). The TCB stays what is measured.
3. ``--tee sim``: compute the measurement over the enclave's own files
   (`infenclave.measurement`), then import the program.
4. Refuse to start if any loaded ``infenclave`` module lies outside the measured files.
5. Take the channel from stdin/stdout (a socketpair from the host under ``sim``; Gramine's
   stdio under SGX) and point fds 0 and 1 elsewhere, so a stray ``print`` cannot corrupt or
   leak into the channel. Logs go to stderr.

Options (fixed in the Gramine manifest, see ``deploy/gramine``):
``--tee {sim,gramine-sgx}``, ``--channel stdio``, ``--bundles DIR`` (where bundles are read),
``--state DIR`` (the ``sim`` backend's per-installation secrets), ``--threads N``.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import sys
import types
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infenclave.enclave",
                                     description="infenclave enclave program (started by the host)")
    parser.add_argument("--tee", choices=("sim", "gramine-sgx"), default="sim")
    parser.add_argument("--channel", choices=("stdio",), default="stdio")
    parser.add_argument("--bundles", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def _isolate_attest_package() -> None:
    """Step 2: a placeholder ``infenclave.attest`` package whose ``__init__`` never runs."""
    if "infenclave.attest" in sys.modules:
        return
    import infenclave

    attest_dir = str(Path(infenclave.__file__).resolve().parent / "attest")
    spec = importlib.machinery.ModuleSpec("infenclave.attest", None, is_package=True)
    spec.submodule_search_locations = [attest_dir]
    placeholder = types.ModuleType("infenclave.attest", "placeholder: see enclave/__main__.py")
    placeholder.__spec__ = spec
    placeholder.__path__ = [attest_dir]
    sys.modules["infenclave.attest"] = placeholder
    infenclave.attest = placeholder  # type: ignore[attr-defined]


def _take_stdio_channel() -> tuple[int, int]:
    """Step 5: duplicate the channel fds, then send fd 0 to /dev/null and fd 1 to stderr."""
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return in_fd, out_fd


def main(argv: list[str] | None = None) -> int:
    """Run the enclave program; the exit code says how it ended (0: the host closed it)."""
    args = _parse(argv)
    sandbox_report = None
    if args.tee == "sim":
        from dataclasses import asdict

        from infenclave.enclave.sandbox import apply_sandbox

        sandbox_report = asdict(apply_sandbox())  # step 1
    _isolate_attest_package()  # step 2

    measurement = None
    if args.tee == "sim":
        from infenclave.measurement import sim_measurement

        measurement = sim_measurement()  # step 3

    from infenclave.enclave.program import EnclaveProgram, log
    from infenclave.measurement import check_loaded_modules

    if args.tee == "sim":
        from infenclave.enclave.evidence import SimEvidenceProducer
        from infenclave.enclave.sealing import SimSealer

        if measurement is None:  # unreachable: computed above for sim
            return 3
        producer: object = SimEvidenceProducer(args.state, measurement)
        sealer: object = SimSealer(args.state, measurement)
    else:
        from infenclave.enclave.evidence import GramineEvidenceProducer
        from infenclave.enclave.sealing import GramineSealer

        producer, sealer = GramineEvidenceProducer(), GramineSealer()

    outside = check_loaded_modules()  # step 4
    if outside:
        log(f"refusing to start: unmeasured project modules loaded: {', '.join(outside)}")
        return 3

    in_fd, out_fd = _take_stdio_channel()  # step 5
    program = EnclaveProgram(
        in_fd=in_fd,
        out_fd=out_fd,
        bundles_dir=args.bundles,
        producer=producer,  # type: ignore[arg-type]
        sealer=sealer,  # type: ignore[arg-type]
        measurement=measurement,
        sandbox=sandbox_report,
        threads=max(0, args.threads),
    )
    if sandbox_report is not None:
        log("sandbox: " + ", ".join(f"{k}={v}" for k, v in sandbox_report.items()
                                    if k in ("network_namespace", "not_dumpable", "no_new_privs", "seccomp_filter")))
    return program.run()


if __name__ == "__main__":
    sys.exit(main())
