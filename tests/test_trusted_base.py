"""The enclave's trusted computing base is exactly what it imports, and it stays small.

The ``sim`` measurement covers the project modules the enclave program has loaded once it
starts (`infenclave.protocol.measurement`). Three things can make that a lie, and each has a
test here: a project import that runs only later (inside a function, after measuring); a
module of the host, verifier, assessment or model zoo entering the enclave; and the TCB
growing unnoticed. The budget (`src/infenclave/enclave/TCB_BUDGET`) counts code lines —
no blanks, comments or docstrings — so that it measures code a reviewer must reason about,
not formatting; raising it is a reviewed change that says why in its commit.
"""

from __future__ import annotations

import ast
import io
import json
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import infenclave
from infenclave.protocol.measurement import UNTRUSTED_PACKAGES, measure_files

PACKAGE = Path(infenclave.__file__).resolve().parent
BUDGET_FILE = PACKAGE / "enclave" / "TCB_BUDGET"


def _measure_probe() -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "infenclave.enclave", "--measure"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def probe() -> dict[str, object]:
    return _measure_probe()


def _module_file(name: str) -> Path | None:
    """The source file of project module *name*, or None if it is not a module."""
    if name == "infenclave":
        return PACKAGE / "__init__.py"
    rel = Path(*name.split(".")[1:])
    for candidate in (PACKAGE / rel / "__init__.py", PACKAGE / rel.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _static_closure(entry: Path) -> set[str]:
    """Every project file reachable from *entry* by import statements anywhere in the code
    (function bodies included), with the packages each import runs on the way."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name != "infenclave" and not name.startswith("infenclave."):
                    continue
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                    file = _module_file(".".join(parts[:i]))
                    if file is not None:
                        todo.append(file)
    return {p.relative_to(PACKAGE).as_posix() for p in seen}


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    source = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def test_measured_set_is_exactly_what_the_enclave_imports(probe: dict[str, object]) -> None:
    measured = set(probe["files"])  # type: ignore[arg-type]
    static = _static_closure(PACKAGE / "enclave" / "__main__.py")
    assert measured == static, {
        "imported later than measured": sorted(static - measured),
        "measured but not imported": sorted(measured - static),
    }
    assert bytes.fromhex(probe["measurement"]) == measure_files(measured)  # type: ignore[arg-type]


def test_no_untrusted_package_enters_the_enclave(probe: dict[str, object]) -> None:
    prefixes = tuple(p.removeprefix("infenclave.").replace(".", "/") + "/" for p in UNTRUSTED_PACKAGES)
    assert not [f for f in probe["files"] if f.startswith(prefixes)]  # type: ignore[union-attr]


def test_the_enclave_refuses_to_start_with_an_untrusted_module_loaded() -> None:
    script = (
        "import infenclave.host.metrics\nfrom infenclave.enclave.__main__ import _measure_loaded\n_measure_loaded()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "untrusted project modules loaded: infenclave.host" in done.stderr


def test_trusted_base_stays_within_its_budget(probe: dict[str, object]) -> None:
    budget = int(BUDGET_FILE.read_text().split()[0])
    total = sum(code_lines(PACKAGE / f) for f in probe["files"])  # type: ignore[union-attr]
    assert total <= budget, f"the TCB has {total} code lines, over its budget of {budget}"


def test_code_line_count_ignores_docstrings_comments_and_blanks(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        '"""Doc.\n\nMore."""\n\n# comment\nx = 1  # trailing\n\n'
        'def f():\n    """Doc."""\n    return (1,\n            2)\n'
    )
    assert code_lines(sample) == 4


def test_protocol_imports_no_side_of_any_boundary() -> None:
    for path in (PACKAGE / "protocol").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("infenclave."):
                assert node.module.startswith(("infenclave.protocol", "infenclave.errors", "infenclave.crypto")), (
                    f"{path.name} imports {node.module}"
                )


def test_measurement_changes_with_any_measured_byte(tmp_path: Path, probe: dict[str, object]) -> None:
    files = list(probe["files"])  # type: ignore[call-overload]
    root = tmp_path / "infenclave"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert measure_files(files, root) == measure_files(files)
    program = root / "enclave" / "program.py"
    program.write_bytes(program.read_bytes() + b"\n")
    assert measure_files(files, root) != measure_files(files)
