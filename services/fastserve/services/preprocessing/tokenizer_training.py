"""Training tokenizers with Hugging Face `tokenizers`, saved so transformers' `AutoTokenizer` loads them.

Three models: byte-level BPE (GPT-2 style: no unknown tokens, documents end with `<|endoftext|>`),
WordPiece (BERT style: `[CLS] text [SEP]`) and Unigram (T5 style: `text </s>`). Each starts from
its usual special tokens; the user's are added after them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from fastserve.models.tokenizers import load_tokenizer
from fastserve.runtime.errors import InvalidArgument

MIN_VOCAB, MAX_VOCAB = 100, 1_000_000

# Role -> token, per model. Roles become transformers' special token attributes.
ROLES: dict[str, dict[str, str]] = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<pad>"},
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    "unigram": {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
}


@dataclass(frozen=True)
class TokenizerSpec:
    model: str
    vocab_size: int
    special_tokens: tuple[str, ...] = ()
    lowercase: bool = False
    min_frequency: int = 2

    def all_special_tokens(self) -> list[str]:
        base = list(dict.fromkeys(ROLES[self.model].values()))
        return base + [t for t in self.special_tokens if t not in base]

    def check(self) -> None:
        if self.model not in ROLES:
            raise InvalidArgument("model must be TOKENIZER_MODEL_BPE, _WORDPIECE or _UNIGRAM", field="model")
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise InvalidArgument(f"vocab_size must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {self.vocab_size}",
                                  field="vocab_size")
        for i, token in enumerate(self.special_tokens):
            if not token or token.strip() != token:
                raise InvalidArgument("special tokens must be non-empty with no surrounding spaces",
                                      field=f"special_tokens[{i}]")
        if self.min_frequency < 1:
            raise InvalidArgument("min_frequency must be at least 1", field="min_frequency")


def _build(spec: TokenizerSpec) -> tuple[Tokenizer, trainers.Trainer]:
    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if spec.lowercase else [])
    specials = spec.all_special_tokens()
    if spec.model == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif spec.model == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                            special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=spec.vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    tok.normalizer = normalizers.Sequence(norm)
    return tok, trainer


def _post_processor(spec: TokenizerSpec, tok: Tokenizer) -> processors.PostProcessor | None:
    if spec.model == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        return processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    if spec.model == "unigram":
        return processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B:1 </s>:1",
                                             special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return None


def train_tokenizer(spec: TokenizerSpec, texts: Iterator[str], length: int | None = None) -> Tokenizer:
    """Train on `texts` (streamed; `length` is the document count, for the trainer's bookkeeping)."""
    spec.check()
    tok, trainer = _build(spec)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    post = _post_processor(spec, tok)
    if post is not None:
        tok.post_processor = post
    return tok


def save_tokenizer(tok: Tokenizer, spec: TokenizerSpec, folder: Path) -> None:
    """`tokenizer.json` plus the transformers files that make `AutoTokenizer.from_pretrained` work."""
    from transformers import PreTrainedTokenizerFast

    roles = ROLES[spec.model]
    extra = [t for t in spec.all_special_tokens() if t not in roles.values()]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles, additional_special_tokens=extra,
                                   model_max_length=1_000_000)
    fast.save_pretrained(str(folder))


@functools.lru_cache(maxsize=16)
def cached_tokenizer(folder: Path) -> Tokenizer:
    """A shared tokenizer for read-only use: published artifacts never change, so caching by folder is safe.
    It encodes each text whole and alone: a tokenizer.json may turn padding and truncation on (MiniLM's
    pads to 128), which `Tokenize` must not apply. Callers must not change them. (Loading itself is
    `fastserve.models.tokenizers`, shared with inference.)"""
    tokenizer = load_tokenizer(folder)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
