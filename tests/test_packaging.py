"""The two packages as a user installs them: built as wheels, each installs only the `fastserve` import
root; the light client, in a venv of its own, pulls in no torch, transformers, celery or redis and
still calls a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"
SERVER_ONLY = ("torch", "transformers", "celery", "redis", "onnxruntime", "tokenizers", "numpy")


def _build(project: Path, out: Path) -> Path:
    # No build isolation: hatchling and grpcio-tools come from the dev venv, so the build needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(project)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    return {"server": _build(ROOT, out / "server"), "client": _build(CLIENT, out / "client")}


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return [n for n in archive.namelist() if ".dist-info/" not in n]


def test_each_wheel_installs_one_import_root_fastserve_as_a_namespace(wheels):
    for wheel in wheels.values():
        names = _names(wheel)
        assert {n.split("/")[0] for n in names} == {"fastserve"}, wheel.name
        # A namespace package: both wheels can install into one `fastserve` without overwriting each other.
        assert "fastserve/__init__.py" not in names
    server, client = set(_names(wheels["server"])), set(_names(wheels["client"]))
    assert not server & client
    assert {"fastserve/services/inference/engine.py", "fastserve/runtime/config.py", "fastserve/models/refs.py",
            "fastserve/stack/commands.py", "fastserve/storage/artifacts.py"} <= server
    assert {"fastserve/client/client.py", "fastserve/cli/__init__.py", "fastserve/inference/v1/inference_pb2.py",
            "fastserve/inference/v1/inference_pb2.pyi", "fastserve/kserve/v2/grpc_service_pb2_grpc.py",
            "fastserve/common/v1/jobs_pb2.py"} <= client
    assert not any(n.startswith(("fastserve/services/", "fastserve/runtime/")) for n in client)


def test_the_module_path_is_the_file_path_under_one_top_level_folder():
    import fastserve.cli
    import fastserve.client
    import fastserve.runtime.config
    import fastserve.services.inference.engine

    for module, folder in ((fastserve.services.inference.engine, "services"), (fastserve.runtime.config, "shared"),
                           (fastserve.client, "clients/python"), (fastserve.cli, "clients/python")):
        relative = Path(module.__file__).relative_to(ROOT / folder)
        dotted = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        assert dotted == module.__name__


def _metadata(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_metadata_declares_ranges_and_constraints_pin_every_dependency_exactly():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for project in (ROOT / "pyproject.toml", CLIENT / "pyproject.toml"):
        meta = _metadata(project)
        deps = meta["dependencies"] + [d for extra in meta.get("optional-dependencies", {}).values() for d in extra]
        for dep in deps:
            name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", dep)[0]).lower()
            if name == "fastserve-client":
                continue
            assert name in pins, f"{dep} has no pin in constraints.txt"
    assert pins["torch"] == "2.13.0"
    client_names = {re.split(r"[<>=\[ ]", d)[0] for d in _metadata(CLIENT / "pyproject.toml")["dependencies"]}
    assert client_names == {"grpcio", "grpcio-status", "grpcio-health-checking", "protobuf",
                            "googleapis-common-protos"}
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


_PROBE = """
import importlib.util, json, sys
from fastserve.client import FastServeClient
absent = {name: importlib.util.find_spec(name) is None for name in sys.argv[2].split(",")}
with FastServeClient("127.0.0.1", ports={"inference": int(sys.argv[1])}) as fs:
    health = fs.health("inference")
    reply = fs.inference.embed("all-MiniLM-L6-v2", ["hello from a light client"])
print(json.dumps({"absent": absent, "health": health, "dimension": reply.dimension,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(","))}))
"""


def test_the_client_alone_in_a_fresh_venv_calls_a_running_server(wheels, gpt_server, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "-c", str(ROOT / "constraints.txt"), f"{wheels['client']}[cli]"],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # Run from an empty folder, so that nothing of this checkout is importable.
    probe = subprocess.run([str(python), "-c", _PROBE, str(gpt_server.port), ",".join(SERVER_ONLY)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout)
    assert result["absent"] == dict.fromkeys(SERVER_ONLY, True) and result["loaded"] == []
    assert result["health"] == "SERVING" and result["dimension"] == 384
    # The command installs too, with the service commands and without the stack's.
    help_text = subprocess.run([str(venv / "bin" / "fastserve"), "--help"], capture_output=True, text=True,
                               cwd=tmp_path, timeout=60).stdout
    assert "embed" in help_text and "health" in help_text and " up " not in help_text
