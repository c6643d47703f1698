"""A model or tokenizer folder's tokenizer, loaded the same way by every service.

Two forms, because callers need two APIs: the Rust `tokenizers.Tokenizer` (inference tokenizes requests
with it, preprocessing builds datasets with it: fast, and free to reconfigure truncation and padding), and
transformers' tokenizer object (optimization calls it on texts to build calibration and parity inputs).
Both read only the folder: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from fastserve.models.kinds import folder_label
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, error_gist

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(folder: Path, field: str = "tokenizer_uri") -> Tokenizer:
    """A fresh fast tokenizer from a tokenizer or model folder, free for its caller to reconfigure.

    `tokenizer.json` when there is one (no transformers import); otherwise whatever transformers can
    convert (a `vocab.txt`, a SentencePiece model)."""
    path = Path(folder) / TOKENIZER_FILE
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust library raises a bare Exception for a bad file
            raise FailedPrecondition(f"the {TOKENIZER_FILE} of {folder_label(folder)} cannot be read: "
                                     f"{error_gist(exc)}", field=field) from None
    return load_transformers_tokenizer(folder, field).backend_tokenizer


def load_transformers_tokenizer(folder: Path, field: str = "tokenizer_uri") -> Any:
    """transformers' `AutoTokenizer` for the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:  # what transformers raises for a folder it cannot read
        raise InvalidArgument(f"no tokenizer in {Path(folder).name}: {error_gist(exc)}", field=field) from None
