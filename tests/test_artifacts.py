import os

import pytest

from fastserve.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from fastserve.storage.artifacts import ArtifactStore, parse_uri, safe_join


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def _publish(store, name="tiny", text="hello", **kwargs):
    with store.publish("datasets", name, metadata={"rows": 1}, **kwargs) as draft:
        (draft.path / "data.txt").write_text(text)
        (draft.path / "sub").mkdir()
        (draft.path / "sub" / "more.bin").write_bytes(b"\0" * 10)
    return draft


def test_publish_versions_and_manifest(store):
    first, second = _publish(store), _publish(store, text="again")
    assert (first.ref.version, second.ref.version) == (1, 2)
    latest = store.resolve("artifact://datasets/tiny/latest")
    assert latest.ref.version == 2 and latest.path == second.path
    assert (latest.path / "data.txt").read_text() == "again"
    files = {f["path"]: f for f in latest.manifest["files"]}
    assert set(files) == {"data.txt", "sub/more.bin"} and files["sub/more.bin"]["size_bytes"] == 10
    assert latest.manifest["metadata"] == {"rows": 1} and latest.size_bytes == 15
    assert store.file(first.ref.uri, "sub/more.bin").read_bytes() == b"\0" * 10
    assert [a.ref.uri for a in store.list("datasets")] == [first.ref.uri, second.ref.uri]


def test_failed_writer_publishes_nothing(store):
    with pytest.raises(RuntimeError):
        with store.publish("datasets", "broken") as draft:
            (draft.path / "part.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    with pytest.raises(NotFound):
        store.resolve("artifact://datasets/broken/latest")
    assert not any((store.root / ".staging").iterdir())


def test_explicit_version_must_be_new(store):
    _publish(store, version=7)
    with pytest.raises(AlreadyExists):
        _publish(store, version=7)
    assert store.versions("datasets", "tiny") == [7]


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "artifact://datasets/tiny", "artifact://nokind/tiny/1", "artifact://datasets/../1",
    "artifact://datasets/tiny/0", "artifact://datasets/tiny/x", "artifact://datasets/.hidden/1",
])
def test_bad_uris_refused(store, uri):
    with pytest.raises(InvalidArgument) as info:
        store.resolve(uri, field_name="dataset_uri")
    assert info.value.violations[0].field == "dataset_uri"
    assert parse_uri("artifact://models/m/3").version == 3


def test_paths_cannot_escape(store, tmp_path):
    draft = _publish(store)
    for bad in ["../../outside", "/etc/passwd", "sub/../../x", ""]:
        with pytest.raises(InvalidArgument):
            store.file(draft.ref.uri, bad)
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    os.symlink(secret, draft.path / "link.txt")
    with pytest.raises(InvalidArgument):
        store.file(draft.ref.uri, "link.txt")
    with pytest.raises(InvalidArgument):
        safe_join(store.root, "../x")


def test_symlinked_name_folder_cannot_escape(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "models").mkdir()
    os.symlink(outside, store.root / "models" / "evil")
    with pytest.raises(InvalidArgument):
        store.resolve("artifact://models/evil/1")
    with pytest.raises(InvalidArgument):
        with store.publish("models", "evil") as d:
            (d.path / "w").write_text("x")
    assert not any(outside.iterdir())


def test_symlink_inside_an_artifact_is_refused_at_publish(store, tmp_path):
    with pytest.raises(InvalidArgument):
        with store.publish("models", "m") as draft:
            os.symlink("/etc/passwd", draft.path / "weights.safetensors")
    assert store.versions("models", "m") == []
