"""Helpers shared by the serving tests: bundles made once per session, real server processes.

Not a test module of its own (it holds no tests); it is named ``test_*`` only so that it sits
with the serving tests. Everything here is real: `infenclave partition` on real models, the
server started as a subprocess on a free 127.0.0.1 port, enclave workers as processes.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

_ROOT = Path(tempfile.mkdtemp(prefix="infenclave-serving-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

#: The cut used by the serving tests: after the fourth MBConv block (the assessment's usual
#: answer for Lite0), Tail from the head convolution's output (global pool + classifier).
LITE_CUTS = ("_blocks.3", "_conv_head")


@dataclass(frozen=True)
class BundlePaths:
    """A partitioned bundle and the owner's files beside it."""

    bundle: Path
    key: Path
    policy: Path
    model_id: str


@functools.cache
def loaded_model(name: str):
    from infenclave.models import load_model

    return load_model(name)


@functools.cache
def make_bundle(model_name: str, front_end: str = LITE_CUTS[0], tail_start: str = LITE_CUTS[1]) -> BundlePaths:
    """Partition *model_name* once per test session (in-process; reuses the cached analysis)."""
    from infenclave.bundle import partition

    out = _ROOT / f"{model_name}-{front_end}-{tail_start}".replace("_", "").replace(".", "-")
    result = partition(loaded_model(model_name), front_end, tail_start, out)
    return BundlePaths(result.bundle_dir, result.key_file, result.policy_file, result.model_id)


@functools.cache
def plain_predictor(model_name: str):
    from infenclave.predict import Predictor

    return Predictor(loaded_model(model_name))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`infenclave serve` as a real subprocess; its stdout and stderr go to `log_path`."""

    def __init__(
        self,
        bundle: Path,
        *,
        workers: int = 2,
        tap_dir: Path | None = None,
        extra: tuple[str, ...] = (),
        state: Path | None = None,
        ready: Callable[[dict], bool] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state or Path(tempfile.mkdtemp(prefix="state-", dir=_ROOT))
        self.log_path = Path(tempfile.mkdtemp(prefix="log-", dir=_ROOT)) / "server.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if tap_dir is not None:
            env["INFENCLAVE_HOST_TAP"] = str(tap_dir)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infenclave.cli",
                "serve",
                str(bundle),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                "--state",
                str(self.state),
                "--log-level",
                "info",
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.wait_ready(ready or (lambda h: h["workers"] == workers))

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=5).json()

    def wait_ready(self, condition, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                health = self.health()
                if condition(health):
                    return health
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def sim_client(url: str, policy: Path, **kwargs):
    """A client that accepts the sim backend (what every test here runs against)."""
    import warnings

    from infenclave.client import Client, SimulationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        return Client(url, policy, allow_simulation=True, **kwargs)


def assert_same_top5(confidential, plain, *, tol: float = 1e-4) -> None:
    """Indices equal, probabilities within *tol*."""
    assert [p.index for p in confidential] == [p.index for p in plain]
    assert [p.label for p in confidential] == [p.label for p in plain]
    np.testing.assert_allclose([p.prob for p in confidential], [p.prob for p in plain], atol=tol, rtol=0)
