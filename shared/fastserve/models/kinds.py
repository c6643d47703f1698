"""What kind of model a folder holds, read from its config.json: one answer for every service.

Inference picks its default task from the kind, optimization its pipeline (exporter, quality metric), and
both load the folder with the kind's transformers head. Before this lived here, the two services each
guessed from the architecture names and disagreed on T5 (`T5ForConditionalGeneration`): inference served it
for generation while optimization took it for an encoder.

Only config.json is read (no transformers import, no model types to register), so describing a folder is
cheap and works for the head-pruned model types too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastserve.runtime.errors import FailedPrecondition, InvalidArgument

ENCODER = "encoder"  # a bare transformer: sentence embeddings or raw hidden states
CLASSIFIER = "classifier"  # a sequence-classification head
DECODER = "decoder"  # a causal LM
SEQ2SEQ = "seq2seq"  # an encoder-decoder LM (T5)
KINDS = (ENCODER, CLASSIFIER, DECODER, SEQ2SEQ)

# The inference task a kind serves when a load request names none.
TASKS = {ENCODER: "embedding", CLASSIFIER: "sequence_classification", DECODER: "generation", SEQ2SEQ: "generation"}

# Architecture names with a language-modelling head; whether it is an encoder-decoder's is in the config.
_GENERATIVE = ("CausalLM", "LMHeadModel", "ForConditionalGeneration", "MTModel")  # MTModel: Marian's


def folder_label(folder: Path) -> str:
    """A folder as messages name it: an artifact version's folder is its number, so its name goes too."""
    return "/".join(Path(folder).parts[-2:])


def read_config(folder: Path, field: str = "model_uri") -> dict[str, Any]:
    """The folder's config.json. A folder without a readable one exists but cannot be used, whatever the
    request asked: FailedPrecondition, naming the request's `field`."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"{folder_label(folder)} has no config.json: not a model folder",
                                 field=field) from None
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(f"the config.json of {folder_label(folder)} is not JSON: {exc.msg} at line "
                                 f"{exc.lineno}", field=field) from None
    except UnicodeDecodeError:
        raise FailedPrecondition(f"the config.json of {folder_label(folder)} is not UTF-8", field=field) from None
    except OSError as exc:
        # str(exc) names the absolute path; the reason alone tells the caller what is wrong.
        raise FailedPrecondition(f"the config.json of {folder_label(folder)} cannot be read: "
                                 f"{exc.strerror or type(exc).__name__}", field=field) from None


def kind_of_config(config: dict[str, Any]) -> str:
    names = " ".join(config.get("architectures") or [])
    encoder_decoder = bool(config.get("is_encoder_decoder"))
    if any(marker in names for marker in _GENERATIVE):
        # Vision-language decoders are "ForConditionalGeneration" too; only an encoder-decoder is seq2seq.
        return SEQ2SEQ if encoder_decoder else DECODER
    if "SequenceClassification" in names:
        return CLASSIFIER
    # A bare encoder-decoder (`T5Model`) still needs decoder inputs: it cannot embed like an encoder.
    return SEQ2SEQ if encoder_decoder else ENCODER


def model_kind(folder: Path, field: str = "model_uri") -> str:
    """encoder, classifier, decoder or seq2seq."""
    return kind_of_config(read_config(folder, field))


def default_task(folder: Path, field: str = "model_uri") -> str:
    """What inference serves the folder for when the request does not say: generation for a causal LM or an
    encoder-decoder, classification for a classification head, else embeddings."""
    return TASKS[model_kind(folder, field)]


def auto_class(kind: str) -> Any:
    """The transformers Auto class that loads a folder of `kind` with its head."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    classes = {ENCODER: AutoModel, CLASSIFIER: AutoModelForSequenceClassification, DECODER: AutoModelForCausalLM,
               SEQ2SEQ: AutoModelForSeq2SeqLM}
    if kind not in classes:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, not {kind!r}", field="kind")
    return classes[kind]
