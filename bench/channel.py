"""TCP vs local socketpair between host and enclave, in one run (`python bench/channel.py`).

Two measurements, both on 127.0.0.1 (a remote enclave on another machine adds the network's
round trip and bandwidth on top):

1. Frames alone: round trips of one frame of IR size (the project's own `encode_frame`,
   `write_frame` and `FrameReader`) between two threads, over an AF_UNIX socketpair (how a
   local worker is reached) and over TCP loopback with TCP_NODELAY (``--listen``), with the
   same 4 MiB socket buffers.
2. End to end: one `infenclave serve` with one local worker and one enclave started with
   ``--listen`` (`serve --enclave`), provisioned once; confidential classifications of a
   real photo alternate between the two workers (the client's round robin), so both paths
   see the same load; median and p90 latency per path.

Writes bench/results/channel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx

from infenclave.protocol.frames import FrameReader, MsgType, encode_frame, write_frame

ROOT = Path(__file__).resolve().parents[1]
BUFFER = 4 * 1024 * 1024
CUTS = ("_blocks.3", "_conv_head")


def _pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "socketpair":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    return a, b


def frames(kind: str, size: int, rounds: int) -> dict[str, float]:
    """Round trips of a *size*-byte frame: host -> enclave (IR2-like) and back (IR1-like)."""
    host, enclave = _pair(kind)
    body = os.urandom(size)

    def echo() -> None:
        reader = FrameReader(enclave.fileno())
        while (frame := reader.read()) is not None:
            write_frame(enclave.fileno(), encode_frame(MsgType.IR1, frame.tag, {"n": 1}, frame.body))

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    reader = FrameReader(host.fileno())
    times = []
    for tag in range(1, rounds + 1):
        t0 = time.perf_counter()
        write_frame(host.fileno(), encode_frame(MsgType.IR2, tag, {"n": 1}, body))
        frame = reader.read()
        times.append(time.perf_counter() - t0)
        if frame is None or frame.tag != tag:
            raise RuntimeError("echo lost a frame")
    host.close()
    thread.join(5)
    enclave.close()
    times = sorted(times[rounds // 10 :])  # drop the warm-up tenth
    return {"median_us": statistics.median(times) * 1e6, "p90_us": times[int(len(times) * 0.9)] * 1e6}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


def end_to_end(requests: int) -> dict[str, object]:
    from infenclave.bundle import partition
    from infenclave.client import Client, SimulationWarning
    from infenclave.host.enclave_pool import _enclave_env
    from infenclave.models import load_model
    from infenclave.sample_images import builtin_images

    work = Path(tempfile.mkdtemp(prefix="infenclave-bench-channel-"))
    procs: list[subprocess.Popen] = []
    try:
        result = partition(load_model("efficientnet-lite0"), *CUTS, work / "bundle")
        state, enclave_port, port = work / "state", _free_port(), _free_port()
        enclave_log = work / "enclave.log"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "infenclave.enclave",
                    "--tee",
                    "sim",
                    "--listen",
                    f"127.0.0.1:{enclave_port}",
                    "--bundles",
                    str(result.bundle_dir.parent),
                    "--state",
                    str(state),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(enclave_log, "wb"),
                env=_enclave_env(),
                cwd=work,
            )
        )
        _wait(lambda: "listening on" in enclave_log.read_text(), "enclave listening")
        url = f"http://127.0.0.1:{port}"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "infenclave.cli",
                    "serve",
                    str(result.bundle_dir),
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--enclave",
                    f"127.0.0.1:{enclave_port}",
                    "--state",
                    str(state),
                    "--log-level",
                    "warning",
                ],
                stdout=open(work / "serve.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        _wait(lambda: httpx.get(url + "/healthz", timeout=5).json()["workers"] == 2, "server ready")
        image = builtin_images()["coffee"].read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            client = Client(url, result.policy_file, allow_simulation=True)
        with client:
            enclaves = client.attest()
            client.provision(result.key_file)
            pids = httpx.get(url + "/healthz", timeout=5).json()["worker_pids"]
            for _ in range(4):  # warm-up, both workers
                client.classify(image)
            latencies: dict[int, list[float]] = {0: [], 1: []}
            for index in range(2 * requests):  # the client alternates its two attested enclaves
                t0 = time.perf_counter()
                client.classify(image)
                latencies[index % 2].append(time.perf_counter() - t0)
        remote_slot = next(int(slot) for slot, pid in pids.items() if pid == 0)
        names = {remote_slot: "tcp (serve --enclave)", 1 - remote_slot: "socketpair (local worker)"}
        # Which attested enclave is which slot: the server lists workers by slot, the client
        # cycles in that order, so request index % 2 is the slot.
        assert len(enclaves) == 2
        return {
            names[slot]: {
                "median_ms": statistics.median(v) * 1e3,
                "p90_ms": sorted(v)[int(len(v) * 0.9)] * 1e3,
                "n": len(v),
            }
            for slot, v in latencies.items()
        }
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--requests", type=int, default=20, help="classifications per path")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "channel.json")
    args = parser.parse_args()
    sizes = {"IR1 Lite0 _blocks.3 (40x28x28 f32)": 40 * 28 * 28 * 4, "1 MiB": 1 << 20}
    raw = {
        name: {kind: frames(kind, size, args.rounds) for kind in ("socketpair", "tcp")} for name, size in sizes.items()
    }
    for name, result in raw.items():
        print(
            f"frame round trip, {name}: "
            + ", ".join(f"{kind} {r['median_us']:.0f} us (p90 {r['p90_us']:.0f})" for kind, r in result.items())
        )
    e2e = end_to_end(args.requests)
    for name, r in e2e.items():
        print(f"classify via {name}: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms (n={r['n']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average": os.getloadavg(),
                },
                "frame_round_trip": raw,
                "classify_end_to_end": e2e,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
