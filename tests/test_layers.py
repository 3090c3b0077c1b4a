"""The import-layer contracts (pyproject.toml, ``lint-imports``) hold, and catch a forbidden import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(
        REPO / "attnopt", tmp_path / "attnopt", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_layers_hold_on_this_tree():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("passes/select.py", "from attnopt.runtime import dispatch", "attnopt layers"),
        ("ir/types.py", "import attnopt.runtime.cpu.dense", "the IR holds"),
        ("runtime/execute.py", "from attnopt.passes import base", "the runtime executes"),
        ("codegen/program.py", "from attnopt.frontend import capture", "attnopt layers"),
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, line, contract):
    root = _copy_package(tmp_path)
    target = root / "attnopt" / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = _lint(root)
    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout
