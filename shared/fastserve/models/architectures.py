"""The architectures FastServe runs, by transformers `model_type`: one list that import checks against,
the generation engine dispatches on and the docs print, so a model accepted at import is one that serves.

Only names: no transformers import. A model type here has code in the engine (generation) or loads with
transformers' Auto classes (encoders); anything else is refused at import with this list in the message.
"""

from __future__ import annotations

# Decoder-only LMs the generation engine runs (the head-pruned GPT-2 that optimization writes included).
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt_neox", "opt")
# Encoder-decoder LMs the generation engine runs (translation, summarisation).
SEQ2SEQ = ("t5", "bart", "marian")
# Encoders served for embeddings and sequence classification.
ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta")
# Model types FastServe writes itself (optimization's head-pruned models); never imported from outside.
INTERNAL = ("fastserve_gpt2_pruned",)

SUPPORTED = DECODERS + SEQ2SEQ + ENCODERS


def describe() -> str:
    """The supported model types as a message lists them."""
    return (f"decoders {', '.join(DECODERS)}; encoder-decoders {', '.join(SEQ2SEQ)}; "
            f"encoders {', '.join(ENCODERS)}")
