"""Small language models built on the spot: a BPE tokenizer and a GPT-2 or Llama trained briefly on the
stdlib docstrings (or left at random weights, for speed measurements), or a T5 trained briefly to copy
snippets of them, saved as a model folder the inference service loads (safetensors, config,
generation config, tokenizer)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from fastserve.corpora.stdlib import stdlib_documents
from fastserve.services.preprocessing.tokenizer_training import TokenizerSpec, save_tokenizer, train_tokenizer


def _tokenizer(folder: Path, vocab: int, seed: int, documents: int):
    """A BPE tokenizer trained on stdlib docstrings and saved in `folder`; (tokenizer, the texts). Seeds torch
    for the model built next."""
    torch.manual_seed(seed)
    texts = [d["text"] for d in stdlib_documents(seed=seed, max_documents=documents)]
    spec = TokenizerSpec("bpe", vocab)
    tokenizer = train_tokenizer(spec, iter(texts), length=len(texts))
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, spec, folder)
    return tokenizer, texts


def build_causal_lm(folder: Path, family: str = "gpt2", hidden: int = 64, layers: int = 2, heads: int = 4,
                    vocab: int = 512, positions: int = 256, train_steps: int = 300, seed: int = 0,
                    documents: int = 1500, eos: bool = True) -> Path:
    """`eos=False`: a model without an end-of-sequence token, whose completions always run to their
    length (for speed measurements)."""
    tokenizer, texts = _tokenizer(folder, vocab, seed, documents)
    eos, pad = tokenizer.token_to_id("<|endoftext|>") if eos else None, tokenizer.token_to_id("<pad>")
    vocab = tokenizer.get_vocab_size()
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                             max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
                             pad_token_id=pad)
        model = LlamaForCausalLM(config)
    if train_steps:
        _train(model, tokenizer, texts, train_steps)
    model.eval().save_pretrained(str(folder))
    return folder


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: on a shared machine torch's threads spin against each other (ten times slower
    measured with other processes busy), and a tiny model gains nothing from a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(model: torch.nn.Module, tokenizer, texts: list[str], steps: int, width: int = 64) -> None:
    # Documents run on into each other (no EOS between them), so completions are long rather than
    # ending after a few tokens: more tokens to compare in tests.
    ids = tokenizer.encode("\n\n".join(texts), add_special_tokens=False).ids
    rows = torch.tensor(ids[:len(ids) // width * width]).view(-1, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    with one_thread():
        for _ in range(steps):
            batch = rows[torch.randint(len(rows), (16,), generator=generator)]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def build_seq2seq(folder: Path, vocab: int = 512, steps: int = 250, seed: int = 0) -> Path:
    """A two-layer T5 that has learnt a little of copying its input."""
    tokenizer, texts = _tokenizer(folder, vocab, seed, documents=1500)
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<pad>")
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=tokenizer.get_vocab_size(), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=eos))
    snippets = [e.ids[:24] for e in tokenizer.encode_batch(texts, add_special_tokens=False) if len(e.ids) >= 8]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    with one_thread():
        for _ in range(steps):
            batch = [snippets[i] for i in torch.randint(len(snippets), (16,), generator=generator).tolist()]
            width = max(map(len, batch)) + 1
            source = torch.tensor([s + [pad] * (width - len(s)) for s in batch])
            labels = torch.tensor([s + [eos] + [-100] * (width - len(s) - 1) for s in batch])
            loss = model(input_ids=source, attention_mask=(source != pad).long(), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().save_pretrained(str(folder))
    return folder


# Per model type, the config fields beyond the common ones: GQA families get half as many KV heads as
# query heads; families whose default head size is not hidden / heads get it set.
_DECODER_FIELDS = {
    "gpt2": lambda h, heads: dict(n_embd=h, n_head=heads, n_layer=2, n_positions=256),
    "llama": lambda h, heads: dict(num_key_value_heads=heads // 2),
    "mistral": lambda h, heads: dict(num_key_value_heads=heads // 2, head_dim=h // heads),
    "qwen2": lambda h, heads: dict(num_key_value_heads=heads // 2),
    "qwen3": lambda h, heads: dict(num_key_value_heads=heads // 2, head_dim=h // heads),
    "phi3": lambda h, heads: dict(num_key_value_heads=heads // 2),
    "gemma": lambda h, heads: dict(num_key_value_heads=heads // 2, head_dim=h // heads),
    "gpt_neox": lambda h, heads: dict(),
    "opt": lambda h, heads: dict(ffn_dim=2 * h, word_embed_proj_dim=h),
}
DECODER_TYPES = tuple(_DECODER_FIELDS)


def build_decoder(folder: Path, model_type: str, hidden: int = 64, heads: int = 4, vocab: int = 300,
                  init: float = 0.4, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A two-layer causal LM of `model_type` (one of DECODER_TYPES) at random weights, with no
    end-of-sequence token, so completions run to their length. Weights drawn wider than the family's
    default (`init`) make greedy output varied rather than one token repeated. `tokenizer_from`: a
    folder whose tokenizer to copy instead of training one."""
    if tokenizer_from is None:
        tokenizer, _ = _tokenizer(folder, vocab, seed, documents=200)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        for path in Path(tokenizer_from).iterdir():
            if path.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(path, folder / path.name)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        torch.manual_seed(seed)
    common = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=tokenizer.token_to_id("<pad>"),
                  initializer_range=init, init_std=init)
    config = AutoConfig.for_model(model_type, **(common | _DECODER_FIELDS[model_type](hidden, heads)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
    model.eval().save_pretrained(str(folder))
    return folder
