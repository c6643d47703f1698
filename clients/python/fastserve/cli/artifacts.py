"""The artifact registry from the terminal: `artifacts list | show | rm | alias | download`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from fastserve.cli.common import LocalError, command, group, print_json, print_table, state, table, to_dict
from fastserve.client.protos import struct_to_dict

artifacts = group("Artifacts in the store (corpora, tokenizers, datasets, models, ...): list, show, alias, "
                  "download, delete.")
URI_FLAGS = {"uri": "uri"}


def _client(ctx: typer.Context):
    return state(ctx).client().registry


def size_text(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # not reached


def time_text(ts) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


@command(artifacts, "list", help="List artifact versions by kind, name and version.",
         flags={"kind": "--kind", "name": "--name"})
def list_artifacts(ctx: typer.Context,
                   kind: Annotated[str, typer.Option(help="Only this kind: corpora, datasets, tokenizers, "
                                                          "checkpoints, models or reports.")] = "",
                   name: Annotated[str, typer.Option(help="Only this name.")] = "") -> int:
    found = list(_client(ctx).list(kind, name))
    if state(ctx).json:
        print_json([to_dict(a) for a in found])
        return 0
    rows = table("uri", "size", "created", "aliases", "source", long=("uri", "source"))
    for a in found:
        rows.add_row(Text(a.ref.uri), size_text(a.size_bytes), time_text(a.create_time), ", ".join(a.aliases) or "-",
                     Text(a.source or "-"))
    print_table(ctx, rows)
    return 0


@command(artifacts, "show", help="Show one version: files, metadata, aliases and lineage.", flags=URI_FLAGS)
def show(ctx: typer.Context, uri: Annotated[str, typer.Argument(
        help="artifact://<kind>/<name>/<version | latest | alias>")]) -> int:
    shown = _client(ctx).show(uri)
    if state(ctx).json:
        print_json(to_dict(shown))
        return 0
    a = shown.artifact
    print(f"{a.ref.uri}  {size_text(a.size_bytes)}  created {time_text(a.create_time)}")
    print(f"source: {shown.source or '-'}   aliases: {', '.join(shown.aliases) or '-'}")
    files = table("path", "size", "sha256", long=("path",), title="files")
    for f in a.files:
        files.add_row(Text(f.path), size_text(f.size_bytes), f.sha256[:16])
    print_table(ctx, files)
    if shown.lineage:
        lineage = table("artifact", "relation", "input", "job", long=("artifact", "input"), title="lineage")
        for e in shown.lineage:
            lineage.add_row(Text(e.uri), e.relation, Text(e.input_uri), e.job_id or "-")
        print_table(ctx, lineage)
    metadata = struct_to_dict(shown.metadata)
    if metadata:
        print(f"metadata: {', '.join(sorted(metadata))} (see --json)")
    return 0


@command(artifacts, "rm", help="Delete one version; refused while a model serves it, an unfinished job uses it "
                               "or an alias points at it.", flags=URI_FLAGS)
def rm(ctx: typer.Context, uri: Annotated[str, typer.Argument(help="artifact://<kind>/<name>/<version number>")]
       ) -> int:
    ref = _client(ctx).delete(uri)
    print_json({"deleted": ref.uri}) if state(ctx).json else print(f"deleted {ref.uri}")
    return 0


@command(artifacts, "alias", help="Point an alias at a version (or remove it with --remove).",
         flags={"alias_uri": "uri", "version": "version"})
def alias(ctx: typer.Context,
          uri: Annotated[str, typer.Argument(help="artifact://<kind>/<name>/<alias>, e.g. "
                                                  "artifact://models/my-model/production")],
          version: Annotated[int | None, typer.Argument(help="The version it points at from now on.")] = None,
          remove: Annotated[bool, typer.Option("--remove", help="Remove the alias.")] = False) -> int:
    if remove == (version is not None):
        raise LocalError("give either a VERSION or --remove")
    reply = _client(ctx).set_alias(uri, 0 if remove else version)
    if state(ctx).json:
        print_json(to_dict(reply))
    elif remove:
        print(f"removed {uri}" + (f" (was version {reply.previous_version})" if reply.previous_version else ""))
    else:
        before = f" (was version {reply.previous_version})" if reply.previous_version else " (new)"
        print(f"{uri} -> {reply.ref.uri}{before}")
    return 0


@command(artifacts, "download", help="Download a version's files into a new folder, each checked by its sha256.",
         flags=URI_FLAGS)
def download(ctx: typer.Context,
             uri: Annotated[str, typer.Argument(help="artifact://<kind>/<name>/<version | latest | alias>")],
             dest: Annotated[Path, typer.Argument(help="The folder to create.")]) -> int:
    if dest.exists():
        raise LocalError(f"{dest} exists; download into a new folder")
    folder = _client(ctx).download(uri, dest)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    if state(ctx).json:
        print_json({"uri": uri, "folder": str(folder), "files": len(files), "size_bytes": total})
    else:
        print(f"{uri}: {len(files)} files, {size_text(total)} in {folder}")
    return 0


def register(app: typer.Typer) -> None:
    app.add_typer(artifacts, name="artifacts")
