"""The layering of smartedit/ is enforced by import-linter, with the contract in pyproject.toml: every module of the
package is named in a layer (`exhaustive`), and a module may import only from the layers below it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is not installed (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                              "sys.exit(lint_imports_command())"]


def _lint(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--config", str(cwd / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_package_keeps_its_layers():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("smartedit/model.py", "from smartedit.engines import registry  # noqa", "smartedit.model is not allowed to "
                                                                             "import smartedit.engines"),
    ("smartedit/graphs/spec.py", "import smartedit.pipeline  # noqa", "smartedit.graphs is not allowed to import "
                                                                      "smartedit.pipeline"),
    ("smartedit/newstage.py", "import smartedit.config  # noqa", "smartedit.newstage"),  # not in any layer
])
def test_an_upward_import_or_an_unlisted_module_breaks_the_contract(tmp_path, module, line, broken):
    """The same check on a copy of the package with one import added: import-linter must refuse it."""
    shutil.copytree(ROOT / "smartedit", tmp_path / "smartedit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text((target.read_text() if target.exists() else '"""A module nobody placed in a layer."""\n')
                      + f"\n{line}\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # the copy shadows the installed package
    r = _lint(tmp_path, env)
    assert r.returncode != 0 and broken in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
