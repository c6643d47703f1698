"""What an imported model folder may hold, checked before anything is published, and the pickle conversion.

The rule is an allow-list, so that nothing the engine does not read (an executable, a pickle, remote code)
reaches the store unnoticed:

- `config.json` (required), `generation_config.json`;
- weights as safetensors: `model.safetensors`, or `model.safetensors.index.json` and every shard it names;
- the tokenizer: `tokenizer.json` (required: the engine runs the fast tokenizer), `tokenizer_config.json`,
  `special_tokens_map.json`, `added_tokens.json`, `vocab.json`, `vocab.txt`, `merges.txt`, SentencePiece
  `*.model`, `chat_template.jinja`, `chat_template.json`;
- companions: `preprocessor_config.json`, the sentence-transformers files (`modules.json`,
  `sentence_bert_config.json`, `config_sentence_transformers.json`, `<n>_Pooling/config.json`), README,
  LICENSE, NOTICE, USE_POLICY and `.gitattributes`.

Pickle weights (`pytorch_model.bin`, its shards with `pytorch_model.bin.index.json`) are refused unless the
import converts them; other pickles (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, `*.pkl`: optimizer states, training
arguments) are refused always. A `*.py` file or an `auto_map` means remote code: refused. Anything else is
refused naming the file. All files lie at the top of the folder but the sentence-transformers pooling configs.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve.models import architectures
from fastserve.models.kinds import TASKS, kind_of_config
from fastserve.runtime.errors import FailedPrecondition, error_gist

CONFIG, TOKENIZER = "config.json", "tokenizer.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
KNOWN = frozenset({
    CONFIG, "generation_config.json", SAFETENSORS, SAFETENSORS_INDEX, TOKENIZER, "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "README.md", "LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE",
    "USE_POLICY.md", ".gitattributes",
    # What FastServe's training writes beside a model: a model downloaded from one stack imports into another.
    "metrics.json"})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_PICKLE_SHARD = re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin")
_POOLING = re.compile(r"\d_Pooling/config\.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_JSON_LIMIT = 64 << 20  # a config or an index this large is not one; refuse rather than read it whole
_HEADER_LIMIT = 100 << 20  # safetensors' own bound on a file's JSON header


@dataclass(frozen=True)
class Layout:
    """What a folder's file names say: its weights, and whether they need converting."""

    pickle_weights: tuple[str, ...]  # pickle files to convert (pytorch_model.bin, or its index and shards)
    sharded: bool  # weights split in shards named by an index


def check_names(paths: list[str], convert_pickle: bool, field: str) -> Layout:
    """Check the file names of a folder against the allow-list; FailedPrecondition naming the file and
    `field` (where the files came from: `header.files` or `header.server_path`)."""
    names = set(paths)
    pickles = []
    for path in sorted(names):
        base = path.rsplit("/", 1)[-1]
        if path.endswith(".py"):
            raise FailedPrecondition(f"{path}: the model ships Python code, which transformers runs only with "
                                     f"trust_remote_code; FastServe imports no remote code (see {CONFIG})",
                                     field=field)
        if path in KNOWN or _SHARD.fullmatch(path) or _POOLING.fullmatch(path) or \
                ("/" not in path and base.endswith(".model")):
            continue
        if path in (PICKLE, PICKLE_INDEX) or _PICKLE_SHARD.fullmatch(path):
            pickles.append(path)
            continue
        if base.endswith(_PICKLE_SUFFIXES):
            raise FailedPrecondition(f"{path} is a pickle file that is not model weights transformers loads (only "
                                     f"{PICKLE} and its shards are converted); leave it out", field=field)
        raise FailedPrecondition(f"{path} is not a file an imported model may hold (config, safetensors weights, "
                                 f"tokenizer files, README, LICENSE); leave it out", field=field)
    if CONFIG not in names:
        raise FailedPrecondition(f"no {CONFIG}: not a Hugging Face model folder", field=field)
    if TOKENIZER not in names:
        raise FailedPrecondition(f"no {TOKENIZER}: FastServe serves with the fast tokenizer, which reads "
                                 f"{TOKENIZER} (save it with the tokenizer's save_pretrained)", field=field)
    safetensors = SAFETENSORS in names or SAFETENSORS_INDEX in names or any(_SHARD.fullmatch(p) for p in names)
    if pickles and safetensors:
        raise FailedPrecondition(f"{pickles[0]}: the folder holds both safetensors and pickle weights; leave the "
                                 "pickle weights out", field=field)
    if pickles and not convert_pickle:
        raise FailedPrecondition(f"{pickles[0]} holds pickle weights, which FastServe does not load: save the model "
                                 "with safetensors, or set convert_pickle_weights to convert them",
                                 field="header.convert_pickle_weights")
    if pickles:
        return _pickle_layout(names, tuple(pickles), field)
    if SAFETENSORS in names and SAFETENSORS_INDEX in names:
        raise FailedPrecondition(f"both {SAFETENSORS} and {SAFETENSORS_INDEX}: keep one form of the weights",
                                 field=field)
    shards = sorted(p for p in names if _SHARD.fullmatch(p))
    if shards and SAFETENSORS_INDEX not in names:
        raise FailedPrecondition(f"{shards[0]} is a shard without {SAFETENSORS_INDEX}", field=field)
    if not safetensors:
        raise FailedPrecondition(f"no weights: {SAFETENSORS}, or {SAFETENSORS_INDEX} and its shards", field=field)
    return Layout((), SAFETENSORS_INDEX in names)


def _pickle_layout(names: set[str], pickles: tuple[str, ...], field: str) -> Layout:
    shards = [p for p in pickles if _PICKLE_SHARD.fullmatch(p)]
    if PICKLE in names and (shards or PICKLE_INDEX in names):
        raise FailedPrecondition(f"both {PICKLE} and sharded pickle weights: keep one form", field=field)
    if shards and PICKLE_INDEX not in names:
        raise FailedPrecondition(f"{shards[0]} is a shard without {PICKLE_INDEX}", field=field)
    if PICKLE_INDEX in names and not shards:
        raise FailedPrecondition(f"{PICKLE_INDEX} without its shards", field=field)
    return Layout(pickles, PICKLE_INDEX in names)


def read_json(path: Path, label: str, field: str) -> dict[str, Any]:
    """A JSON object file of the folder; FailedPrecondition naming `label` (its name) otherwise."""
    if path.stat().st_size > _JSON_LIMIT:
        raise FailedPrecondition(f"{label} is over {_JSON_LIMIT >> 20} MiB: not a config", field=field)
    try:
        value = json.loads(path.read_bytes().decode())
    except UnicodeDecodeError:
        raise FailedPrecondition(f"{label} is not UTF-8", field=field) from None
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(f"{label} is not JSON: {exc.msg} at line {exc.lineno}", field=field) from None
    if not isinstance(value, dict):
        raise FailedPrecondition(f"{label} is not a JSON object", field=field)
    return value


@dataclass(frozen=True)
class ModelInfo:
    """What config.json says of the model."""

    model_type: str
    architecture: str
    kind: str

    @property
    def default_task(self) -> str:
        return TASKS[self.kind]


def check_config(config: dict[str, Any], field: str) -> ModelInfo:
    """A config the engine can run without remote code; FailedPrecondition naming config.json otherwise."""
    if "auto_map" in config:
        raise FailedPrecondition(f"{CONFIG} has an auto_map: the architecture's code ships with the model and "
                                 "needs trust_remote_code, which FastServe does not run", field=field)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise FailedPrecondition(f"{CONFIG} has no model_type: not a transformers config", field=field)
    if model_type in architectures.INTERNAL:
        raise FailedPrecondition(f"{CONFIG}: model_type {model_type!r} is FastServe's own (optimization writes "
                                 "it); it is not imported", field=field)
    if model_type not in architectures.SUPPORTED:
        raise FailedPrecondition(f"{CONFIG}: model_type {model_type!r} is not one FastServe runs; supported: "
                                 f"{architectures.describe()}", field=field)
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FailedPrecondition(f"{CONFIG}: architectures must be a list of class names", field=field)
    return ModelInfo(model_type, names[0] if names else "", kind_of_config(config))


def check_tokenizer(files: dict[str, Path], field: str) -> None:
    """The fast tokenizer loads, and no tokenizer file asks for remote code (`files`: the folder's names
    to the files holding them)."""
    from tokenizers import Tokenizer

    if "tokenizer_config.json" in files:
        tokenizer_config = read_json(files["tokenizer_config.json"], "tokenizer_config.json", field)
        if "auto_map" in tokenizer_config:
            raise FailedPrecondition("tokenizer_config.json has an auto_map: the tokenizer's code ships with the "
                                     "model and needs trust_remote_code, which FastServe does not run", field=field)
    try:
        Tokenizer.from_file(str(files[TOKENIZER]))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises a bare Exception for a bad file
        raise FailedPrecondition(f"{TOKENIZER} cannot be read: {error_gist(exc)}", field=field) from None


def check_weights(files: dict[str, Path], layout: Layout, field: str) -> None:
    """Safetensors weights whose headers read, and, when sharded, every shard the index names present and
    no shard it does not name."""
    if layout.pickle_weights:
        return
    weights = [SAFETENSORS]
    if layout.sharded:
        weights = _index_shards(files[SAFETENSORS_INDEX], SAFETENSORS_INDEX, field)
        missing = [f for f in weights if f not in files]
        if missing:
            raise FailedPrecondition(f"{SAFETENSORS_INDEX} names {missing[0]}, which is not in the folder"
                                     f"{f' ({len(missing)} shards missing)' if len(missing) > 1 else ''}",
                                     field=field)
        unnamed = sorted(p for p in files if _SHARD.fullmatch(p) and p not in weights)
        if unnamed:
            raise FailedPrecondition(f"{unnamed[0]} is not named by {SAFETENSORS_INDEX}", field=field)
    for name in weights:
        _check_header(files[name], name, field)


def _index_shards(path: Path, label: str, field: str) -> list[str]:
    weight_map = read_json(path, label, field).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FailedPrecondition(f"{label} has no weight_map", field=field)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise FailedPrecondition(f"{label} names a shard {shard!r} that is not a file of the folder", field=field)
    return shards


def _check_header(path: Path, label: str, field: str) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= min(_HEADER_LIMIT, size - 8):
            raise FailedPrecondition(f"{label} is not a safetensors file", field=field)
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise FailedPrecondition(f"{label} is not a safetensors file: its header is not a JSON object", field=field)


def convert_pickle(source: dict[str, Path], layout: Layout, target: Path, field: str) -> list[str]:
    """Write the pickle weights (`source`: their names to their files) as safetensors into `target`, shard
    for shard; return the safetensors names written. Loaded with `weights_only=True`, which refuses any
    pickle that would build objects other than tensors."""
    if not layout.sharded:
        _convert_one(source[PICKLE], PICKLE, target / SAFETENSORS, field)
        return [SAFETENSORS]
    index = read_json(source[PICKLE_INDEX], PICKLE_INDEX, field)
    shards = _index_shards(source[PICKLE_INDEX], PICKLE_INDEX, field)
    renamed = {}
    for shard in shards:
        if shard not in source:
            raise FailedPrecondition(f"{PICKLE_INDEX} names {shard}, which is not in the folder", field=field)
        renamed[shard] = shard.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"
        _convert_one(source[shard], shard, target / renamed[shard], field)
    unnamed = sorted(set(source) - set(shards) - {PICKLE_INDEX})
    if unnamed:
        raise FailedPrecondition(f"{unnamed[0]} is not named by {PICKLE_INDEX}", field=field)
    new_index = {"metadata": index.get("metadata", {}),
                 "weight_map": {k: renamed[v] for k, v in index["weight_map"].items()}}
    (target / SAFETENSORS_INDEX).write_text(json.dumps(new_index, indent=2, sort_keys=True))
    return [*renamed.values(), SAFETENSORS_INDEX]


def _convert_one(path: Path, label: str, out: Path, field: str) -> None:
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a refused or broken pickle raises any of a dozen classes
        raise FailedPrecondition(f"{label} cannot be loaded as weights: {error_gist(exc)}", field=field) from None
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FailedPrecondition(f"{label} is not a state dict of named tensors", field=field)
    tensors, seen = {}, set()
    for key, tensor in state.items():
        # safetensors refuses tensors that share memory (tied embeddings saved twice): give each its own.
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone().contiguous() if storage in seen else tensor.contiguous()
        seen.add(storage)
    save_file(tensors, str(out), metadata={"format": "pt"})
