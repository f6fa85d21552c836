"""Entry point of the enclave program: ``python -m infenclave.enclave --tee sim ...``.

Start-up order matters, and is the reason this file exists:

0. Before anything else (before any import can print): take the channel from stdin/stdout
   (a socketpair from the host under ``sim``; Gramine's stdio under SGX) onto fds of its
   own, and point fd 0 at ``/dev/null``. Under Gramine fds 1 and 2 are the *same* host
   handle, the channel itself, so no application byte may reach either: fds 1 and 2 go to
   ``/dev/null`` under ``--tee gramine-sgx``, and under ``sim`` whenever fd 2 is the
   channel too. Otherwise (``sim`` with a separate stderr) logs go to stderr, which the host
   reads, and fd 1 joins them. A stray ``print``, a warning or a native library's message
   can then neither corrupt nor leak into the frame stream.
1. ``--tee sim``: `sandbox.prepare_environment`, before numpy or onnxruntime are imported,
   so that importing them starts no thread. Under Gramine the manifest is the sandbox, so
   the sandbox steps are skipped there.
2. Import the program and both backends' evidence and sealing code. These imports *are* the
   trusted computing base: nothing else from the project is loaded later.
3. Refuse to start if a module of the host, the verifier, the assessment or the model zoo
   was loaded (`protocol.measurement.untrusted_modules`).
4. ``--tee sim``: measure exactly the project modules now loaded
   (`protocol.measurement`): the measurement covers what runs, derived, not listed.
4b. ``--tee sim``: load the sim secrets from ``--state``, then apply the sandbox
   (`sandbox.apply_sandbox`): after it the process reads only the installation and the
   bundles, and no longer is the user that owns the state files. Nothing from the channel
   has been read yet.

``--listen HOST:PORT`` (instead of stdio): step 0 creates the listening TCP socket (fd 0 to
``/dev/null``, fd 1 to stderr), before the walls, which then allow ``accept`` on that one
socket and nothing else of the network (`sandbox`): the enclave never opens a connection.
It serves one host connection at a time with the same frames, each with a fresh program
(a fresh key pair: a reconnecting host attests again, as after a worker restart).

``--measure`` runs steps 2-4 without a sandbox or a channel and prints the measurement and
the measured files as JSON: how `infenclave partition` learns the value for its starter
policy, from the same code path.

Options (fixed in the Gramine manifest, see ``deploy/gramine``):
``--tee {sim,gramine-sgx}``, ``--channel stdio``, ``--bundles DIR`` (where bundles are read),
``--state DIR`` (the ``sim`` backend's per-installation secrets; not used, and not needed,
under ``gramine-sgx``), ``--threads N``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infenclave.enclave", description="infenclave enclave program (started by the host)"
    )
    parser.add_argument("--tee", choices=("sim", "gramine-sgx", "tdx", "sev-snp"), default="sim")
    parser.add_argument(
        "--tsm-root", type=Path, default=None, help="--tee tdx/sev-snp: the configfs-tsm report directory"
    )
    parser.add_argument("--privlevel", type=int, default=None, help="--tee sev-snp: the VMPL to report")
    parser.add_argument("--channel", choices=("stdio",), default="stdio")
    parser.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="serve hosts over TCP instead of stdio (one connection at a time)",
    )
    parser.add_argument("--bundles", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--measure", action="store_true", help="print the sim measurement and the measured files as JSON, then exit"
    )
    args = parser.parse_args(argv)
    if not args.measure and (args.bundles is None or (args.state is None and args.tee == "sim")):
        parser.error("--bundles (and, with --tee sim, --state) are required")
    return args


def _same_file(fd_a: int, fd_b: int) -> bool:
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _take_stdio_channel(tee: str) -> tuple[int, int]:
    """Step 0: the channel on fds of its own; fd 0 to /dev/null; fds 1 and 2 to /dev/null
    when stderr is (or may be) the channel, else fd 1 to stderr. Returns (in fd, out fd)."""
    in_fd, out_fd = os.dup(0), os.dup(1)
    quiet = tee != "sim" or _same_file(2, 0) or _same_file(2, 1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if quiet:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    else:
        os.dup2(2, 1)
    os.close(devnull)
    return in_fd, out_fd


def _listen(address: str, tee: str) -> socket.socket:
    """Step 0 for ``--listen``: fd 0 to /dev/null, fd 1 to stderr (/dev/null too under
    Gramine), and the listening socket, made now so that the walls can refuse all others."""
    host, _, port = address.rpartition(":")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull if tee == "gramine-sgx" else 2, 1)
    os.close(devnull)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    listener.bind((host.strip("[]"), int(port)))
    listener.listen(1)
    return listener


def _measure_loaded() -> tuple[list[str], bytes]:
    """Steps 3-4: refuse untrusted modules, then measure every loaded project module."""
    from infenclave.errors import EnclaveError
    from infenclave.protocol.measurement import (
        loaded_project_files,
        measure_files,
        untrusted_modules,
    )

    names = [n for n in sys.modules if n == "infenclave" or n.startswith("infenclave.")]
    outside = untrusted_modules(names)
    if outside:
        raise EnclaveError(f"refusing to start: untrusted project modules loaded: {', '.join(outside)}")
    modules = [(n, getattr(sys.modules[n], "__file__", None)) for n in names]
    # Run as ``-m``, this file is ``__main__``, not ``infenclave.enclave.__main__``.
    modules.append(("infenclave.enclave.__main__", __file__))
    files = loaded_project_files(modules)
    return files, measure_files(files)


def main(argv: list[str] | None = None) -> int:
    """Run the enclave program; the exit code says how it ended (0: the host closed it)."""
    args = _parse(argv)
    listener = _listen(args.listen, args.tee) if args.listen and not args.measure else None
    channel = None if args.measure or listener else _take_stdio_channel(args.tee)  # step 0
    sandbox_report = None
    if args.tee == "sim" and not args.measure:
        from infenclave.enclave.sandbox import prepare_environment

        prepare_environment()  # step 1

    # Step 2: everything the program will ever run from this project.
    from infenclave.enclave import (
        sandbox as _sandbox,  # noqa: F401  (measured on every path)
    )
    from infenclave.enclave.evidence import GramineEvidenceProducer, SimEvidenceProducer
    from infenclave.enclave.program import EnclaveProgram, log
    from infenclave.enclave.sealing import GramineSealer, SimSealer
    from infenclave.enclave.tsm import DEFAULT_TSM_ROOT, ConfigfsTsmEvidenceProducer, NoSealer
    from infenclave.errors import EnclaveError

    try:
        files, measurement = _measure_loaded()  # steps 3-4
    except (EnclaveError, ValueError) as exc:
        log(str(exc))
        return 3
    if args.measure:
        print(json.dumps({"measurement": measurement.hex(), "files": files}))
        return 0

    if args.tee == "sim":
        producer: object = SimEvidenceProducer(args.state, measurement)
        sealer: object = SimSealer(args.state, measurement)
        measured: bytes | None = measurement
        from dataclasses import asdict

        from infenclave.enclave.sandbox import apply_sandbox

        try:
            sandbox_report = asdict(
                apply_sandbox(  # step 4b
                    args.bundles, listen_fd=None if listener is None else listener.fileno()
                )
            )
        except EnclaveError as exc:
            log(f"refusing to start: {exc}")
            return 3
    elif args.tee in ("tdx", "sev-snp"):  # the confidential VM is the wall (docs/serving.md)
        try:
            producer = ConfigfsTsmEvidenceProducer(
                args.tee, args.tsm_root or DEFAULT_TSM_ROOT, privlevel=args.privlevel
            )
        except EnclaveError as exc:
            log(f"refusing to start: {exc}")
            return 3
        sealer, measured = NoSealer(args.tee), None
    else:
        producer, sealer, measured = GramineEvidenceProducer(), GramineSealer(), None

    if sandbox_report is not None:
        log(
            "sandbox: "
            + ", ".join(
                f"{k}={v}"
                for k, v in sandbox_report.items()
                if k in ("uid", "network_namespace", "user_namespace", "landlock_abi", "seccomp_filter")
            )
        )

    def serve(in_fd: int, out_fd: int) -> int:
        return EnclaveProgram(
            in_fd=in_fd,
            out_fd=out_fd,
            bundles_dir=args.bundles,
            producer=producer,  # type: ignore[arg-type]
            sealer=sealer,  # type: ignore[arg-type]
            measurement=measured,
            sandbox=sandbox_report,
            threads=max(0, args.threads),
        ).run()

    if listener is not None:
        log(f"listening on {args.listen}")
        while True:  # one host at a time; the next one gets a fresh program and key
            connection, _ = listener.accept()
            with connection:
                serve(connection.fileno(), connection.fileno())
    if channel is None:  # unreachable: only --measure has no channel, and it returned
        return 3
    return serve(*channel)


if __name__ == "__main__":
    sys.exit(main())
