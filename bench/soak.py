"""Soak: many concurrent clients for a fixed time against `infenclave serve` (sim), every answer
checked; then the same with a worker killed every few seconds.

    nice .venv/bin/python bench/soak.py [--clients 32] [--seconds 60] [--kill-every 15]

Everything is real and local: the bundle is partitioned here (Lite0, `_blocks.3` /
`_conv_head`), the server is a subprocess on 127.0.0.1 with two sim enclave workers, and each
client is its own `infenclave.Client` (its own attestation) in its own thread, sending back to
back until the time is up. Each client has its own image (the 8 built-in photos in 4 variants:
as shipped, mirrored, re-encoded as JPEG, rotated), and checks each answer against
`infenclave predict`'s top-5 for that image:

- lost: a request that raised (any error, the server's included);
- mismatched: an answer that is not that image's top-5 (indices, and probabilities within 1e-4);
- cross_client: an answer that equals another client's image's top-5 and not its own, or a
  sealed answer that does not open with this request's one-time key.

Reported per run: answers, the three counts, latency p50/p90/p99/max, throughput, peak
resident memory of the host and of each worker process (sampled from /proc every 0.25 s and
VmHWM at the end), the load average; the second run adds each kill and the time until the
pool was whole again (`/healthz`: every slot ready with a new pid). Output:
``bench/results/soak.json``. The run stops by itself; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
CUTS = ("_blocks.3", "_conv_head")
MODEL = "efficientnet-lite0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def images() -> list[bytes]:
    """32 distinct encoded images: each built-in photo as shipped, mirrored, JPEG, rotated."""
    from PIL import Image, ImageOps

    from infenclave.sample_images import builtin_images

    out = []
    for path in builtin_images().values():
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        out.append(data)
        for variant, fmt in ((ImageOps.mirror(img), "PNG"), (img, "JPEG"), (img.rotate(90, expand=True), "PNG")):
            buf = io.BytesIO()
            variant.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            out.append(buf.getvalue())
    return out


class Server:
    def __init__(self, bundle: Path, workers: int, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log = open(workdir / f"server-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infenclave.cli",
                "serve",
                str(bundle),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                "--state",
                str(tempfile.mkdtemp(prefix="state-", dir=workdir)),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.wait(lambda h: h["workers"] == workers, 180)

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=5).json()

    def wait(self, condition, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                health = self.health()
                if condition(health):
                    return health
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Memory:
    """Peak RSS per process: the host and every worker pid seen in /healthz."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak: dict[int, float] = {}
        self.role: dict[int, str] = {server.process.pid: "host"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for slot, pid in self.server.health()["worker_pids"].items():
                    self.role.setdefault(int(pid), f"worker {slot}")
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            for pid in list(self.role):
                self._sample(pid, "VmRSS")
            self._stop.wait(0.25)

    def _sample(self, pid: int, field: str) -> None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    mib = int(line.split()[1]) / 1024
                    self.peak[pid] = max(self.peak.get(pid, 0.0), mib)
        except (OSError, ValueError):
            pass

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        for pid in self.role:
            self._sample(pid, "VmHWM")  # exact peak of the processes still alive
        return {f"{self.role[pid]} (pid {pid})": round(mib, 1) for pid, mib in sorted(self.peak.items())}


def run(
    server: Server,
    policy: Path,
    imgs: list[bytes],
    expected: list,
    clients: int,
    seconds: float,
    kill_every: float | None,
) -> dict:
    from infenclave.client import Client, SimulationWarning
    from infenclave.errors import VerificationError

    def same(a, b) -> bool:
        return [p.index for p in a] == [p.index for p in b] and bool(
            np.allclose([p.prob for p in a], [p.prob for p in b], atol=1e-4, rtol=0)
        )

    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"answers": 0, "lost": 0, "mismatched": 0, "cross_client": 0}
    errors: dict[str, int] = {}
    memory = Memory(server)
    started = time.monotonic()
    end = started + seconds

    def client_loop(index: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            client = Client(server.url, policy, allow_simulation=True, timeout=60)
        mine = index % len(imgs)
        with client:
            while time.monotonic() < end:
                t0 = time.monotonic()
                outcome = "answers"
                try:
                    answer = client.classify(imgs[mine], 5)
                    if not same(answer, expected[mine]):
                        others = any(same(answer, expected[j]) for j in range(len(imgs)) if j != mine)
                        outcome = "cross_client" if others else "mismatched"
                except VerificationError as exc:  # an answer that does not open for this request
                    outcome = "cross_client"
                    name = f"{type(exc).__name__}: {exc}"[:160]
                    with lock:
                        errors[name] = errors.get(name, 0) + 1
                except Exception as exc:  # noqa: BLE001 - counted and named in the report
                    outcome = "lost"
                    name = f"{type(exc).__name__}: {exc}"[:160]
                    with lock:
                        errors[name] = errors.get(name, 0) + 1
                with lock:
                    counts[outcome] += 1
                    if outcome == "answers":
                        latencies.append(time.monotonic() - t0)

    kills: list[dict] = []

    def killer() -> None:
        """Kill a worker every *kill_every* seconds on a fixed schedule (slots in turn); each
        kill's recovery is timed by its own thread: from SIGKILL until every slot is ready
        again and that slot runs a new pid."""
        slot, at = 0, started + kill_every
        watchers = []
        while at < end:
            time.sleep(max(0.0, at - time.monotonic()))
            victim = int(server.health()["worker_pids"][str(slot)])
            os.kill(victim, signal.SIGKILL)
            watcher = threading.Thread(target=recovery, args=(slot, victim, time.monotonic()))
            watcher.start()
            watchers.append(watcher)
            slot, at = (slot + 1) % server.workers, at + kill_every
        for watcher in watchers:
            watcher.join()

    def recovery(slot: int, victim: int, t0: float) -> None:
        try:
            server.wait(
                lambda h: h["workers_ready"] == server.workers
                and int(h["worker_pids"].get(str(slot), victim)) != victim,
                120,
            )
            took: float | None = round(time.monotonic() - t0, 2)
        except TimeoutError:
            took = None
        with lock:
            kills.append({"at_s": round(t0 - started, 1), "slot": slot, "pid": victim, "recovery_s": took})

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    if kill_every:
        threads.append(threading.Thread(target=killer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    peaks = memory.stop()
    lat = np.asarray(latencies) * 1e3
    result = {
        "clients": clients,
        "seconds": round(elapsed, 1),
        **counts,
        "throughput_per_s": round(counts["answers"] / elapsed, 2),
        "latency_ms": {
            q: round(float(np.percentile(lat, p)), 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        }
        if len(lat)
        else {},
        "peak_rss_mib": peaks,
        "errors": errors,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    if kill_every:
        result["kill_every_s"] = kill_every
        result["kills"] = kills
        done = [k["recovery_s"] for k in kills if k["recovery_s"] is not None]
        result["recovery_s"] = {"mean": round(float(np.mean(done)), 2), "max": max(done)} if done else None
    return result


def _run_from_a_snapshot() -> None:
    """Re-run this script on a copy of the package: the bundle's policy pins the enclave's
    measurement (a hash of its code), so an edit to the working tree during the run would
    otherwise make restarted workers refuse the sealed key and clients refuse the workers."""
    if os.environ.get("INFENCLAVE_SOAK_SNAPSHOT"):
        return
    import shutil

    import infenclave

    snapshot = Path(tempfile.mkdtemp(prefix="infenclave-soak-src-"))
    shutil.copytree(
        Path(infenclave.__file__).parent, snapshot / "infenclave", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = dict(
        os.environ,
        INFENCLAVE_SOAK_SNAPSHOT="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(snapshot), os.environ.get("PYTHONPATH")])),
    )
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _run_from_a_snapshot()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kill-every", type=float, default=15.0, help="0: no second run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args()

    from infenclave.bundle import partition
    from infenclave.client import Client, SimulationWarning
    from infenclave.models import load_model
    from infenclave.predict import Predictor

    workdir = Path(tempfile.mkdtemp(prefix="infenclave-soak-"))
    model = load_model(MODEL)
    bundle = partition(model, *CUTS, workdir / "bundle")
    imgs = images()
    predictor = Predictor(model)
    expected = [predictor.predict(image, 5) for image in imgs]
    import infenclave

    print(f"serving the package copy in {Path(infenclave.__file__).parent}", flush=True)
    report: dict = {
        "model": MODEL,
        "cuts": list(CUTS),
        "workers": args.workers,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "distinct_images": len(imgs),
        "runs": {},
    }
    runs = [("steady", None)] + ([("worker_killed", args.kill_every)] if args.kill_every else [])
    for name, kill_every in runs:
        server = Server(bundle.bundle_dir, args.workers, workdir)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SimulationWarning)
                with Client(server.url, bundle.policy_file, allow_simulation=True) as owner:
                    owner.provision(bundle.key_file)
            server.wait(lambda h: h["workers_ready"] == args.workers, 60)
            print(f"{name}: {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
            report["runs"][name] = run(
                server, bundle.policy_file, imgs, expected, args.clients, args.seconds, kill_every
            )
            print(json.dumps(report["runs"][name], indent=1), flush=True)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
