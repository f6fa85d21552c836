"""The package's public surface is small, explicit and importable."""

from __future__ import annotations

import subprocess
import sys

import infenclave


def test_public_names() -> None:
    assert set(infenclave.__all__) == {
        "__version__",
        "Client",
        "load_model",
        "analyse",
        "ternary_split",
        "AssessOptions",
        "run_assess",
        "partition",
        "InfenclaveError",
    }
    for name in infenclave.__all__:
        assert getattr(infenclave, name) is not None


def test_importing_the_package_pulls_in_nothing_heavy() -> None:
    code = "import sys, infenclave; print(sorted(m for m in ('torch', 'httpx', 'fastapi', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    for name in infenclave.__all__:
        if name != "__version__":
            assert f"`{name}" in doc, name
            assert getattr(infenclave, name).__doc__, name
