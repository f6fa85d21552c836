"""Shared fixtures: real models and real photos, loaded once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "tests" / "data" / "evidence"
CLI = [sys.executable, "-m", "infenclave.cli"]


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    from infenclave.sample_images import builtin_images

    return builtin_images()


@pytest.fixture(scope="session")
def lite0():
    from infenclave.models import load_model

    return load_model("efficientnet-lite0")


@pytest.fixture(scope="session")
def lite0_net(lite0):
    from infenclave.network import analyse

    return analyse(lite0)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `infenclave ...` as a real subprocess (the way a user does)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
