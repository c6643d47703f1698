"""The import rules of docs/architecture.md (pyproject.toml's `[tool.importlinter]`), as `make lint` checks
them: services independent of each other, the layers below them never importing a service, the client
importing nothing of the server."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_contract_is_kept():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout
    assert len(contracts) >= 3


def test_a_broken_rule_is_caught(tmp_path):
    # The same checker on a copy of the rules with a contract this code base breaks on purpose: the
    # inference service may not import the runtime. If the checker ran on nothing, this would pass too.
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = fastserve\n\n[importlinter:contract:probe]\n"
                      "name = probe\ntype = forbidden\nsource_modules = fastserve.services.inference\n"
                      "forbidden_modules = fastserve.runtime\n")
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "fastserve.services.inference" in result.stdout
