"""Wheel build hook: generate the gRPC stubs from ../../proto into the wheel, so the client wheel
builds from a clean checkout without `make proto` and its stubs always match the contracts."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class StubsHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or version == "editable":
            return  # editable installs read gen/python, which `make proto` writes
        from grpc_tools import protoc

        proto_root = Path(self.root, "..", "..", "proto").resolve()
        self._out = Path(tempfile.mkdtemp(prefix="fastserve-stubs-"))
        files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
        include = Path(protoc.__file__).parent / "_proto"  # the well-known types
        code = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={self._out}",
                            f"--pyi_out={self._out}", f"--grpc_python_out={self._out}", *files])
        if code != 0:
            sys.exit(f"protoc failed ({code}) on {proto_root}")
        for path in (self._out / "fastserve").rglob("*.py*"):
            build_data["force_include"][str(path)] = str(path.relative_to(self._out))

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_out", None):
            shutil.rmtree(self._out, ignore_errors=True)
