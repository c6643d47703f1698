"""Small BART and Marian encoder-decoders built on the spot, saved as model folders the inference service
loads (safetensors, config, generation config, tokenizer): trained briefly to copy snippets of stdlib
docstrings (for greedy parity: trained logits are not near-ties), or, for a translation round trip, to
translate short sentences of a dozen code words into number words ("alpha bravo" -> "one two") until
they get them right."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel

from fastserve.corpora.stdlib import stdlib_documents
from fastserve.services.preprocessing.tokenizer_training import TokenizerSpec, save_tokenizer, train_tokenizer
from tests.support.tiny_models import one_thread

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima")


def sentences(count: int, seed: int, shortest: int = 2, longest: int = 5) -> list[str]:
    """Random sentences of code words (the round trip's language)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(shortest, longest))) for _ in range(count)]


NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def training_sentences(seed: int = 0) -> list[str]:
    """What `build_translating_marian(seed=seed)` learns from."""
    return sentences(4000, seed + 1)


def translate(text: str) -> str:
    """The round trip's translation: each code word into its number word."""
    return " ".join(NUMBERS[WORDS.index(w)] for w in text.split())


def _tokenizer(folder: Path, model: str, vocab: int, texts: list[str]):
    """BPE (GPT-2 style, no special tokens added to a text) or Unigram (Marian's SentencePiece style: `text
    </s>`), trained on `texts` and saved in `folder`."""
    spec = TokenizerSpec(model, vocab)
    tokenizer = train_tokenizer(spec, iter(texts), length=len(texts))
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, spec, folder)
    return tokenizer


def _docstrings(seed: int, documents: int = 400) -> list[str]:
    return [d["text"] for d in stdlib_documents(seed=seed, max_documents=documents)]


def _train(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], pad: int, steps: int,
           lr: float = 3e-3, batch: int = 16) -> None:
    """Teacher-forced training on (source, target) pairs; transformers shifts the labels right behind the
    decoder's start token, on one thread (`one_thread`)."""
    with one_thread():
        _steps(model, pairs, pad, steps, lr, batch)
    model.eval()


def _steps(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], pad: int, steps: int, lr: float,
           batch: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        chosen = [pairs[i] for i in torch.randint(len(pairs), (batch,), generator=generator).tolist()]
        src_width, tgt_width = max(len(s) for s, _ in chosen), max(len(t) for _, t in chosen)
        source = torch.tensor([s + [pad] * (src_width - len(s)) for s, _ in chosen])
        labels = torch.tensor([t + [-100] * (tgt_width - len(t)) for _, t in chosen])
        loss = model(input_ids=source, attention_mask=(source != pad).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _copy_pairs(tokenizer, texts: list[str], eos: int, special: bool) -> list[tuple[list[int], list[int]]]:
    snippets = [e.ids[:16] for e in tokenizer.encode_batch(texts, add_special_tokens=False) if len(e.ids) >= 6]
    # Marian's sources close with </s> as its tokenizer writes them; a BPE source carries no special token.
    return [(s + [eos] if special else s, s + [eos]) for s in snippets]


def build_bart(folder: Path, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 300,
               positions: int = 128, train_steps: int = 300, seed: int = 0) -> Path:
    """A BART (byte-level BPE, learned positions, `layernorm_embedding`, scaled embeddings) that has learnt
    a little of copying its input. Start token = EOS, as BART's checkpoints have it."""
    torch.manual_seed(seed)
    texts = _docstrings(seed)
    tokenizer = _tokenizer(folder, "bpe", vocab, texts)
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<pad>")
    config = BartConfig(vocab_size=tokenizer.get_vocab_size(), d_model=hidden, encoder_layers=layers,
                        decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                        encoder_ffn_dim=hidden * 2, decoder_ffn_dim=hidden * 2, max_position_embeddings=positions,
                        scale_embedding=True, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos,
                        decoder_start_token_id=eos, forced_eos_token_id=None)
    model = BartForConditionalGeneration(config)
    with torch.no_grad():  # a bias that moves the logits, so a decoder that drops it is caught
        model.final_logits_bias.normal_(0.0, 0.5)
    if train_steps:
        _train(model, _copy_pairs(tokenizer, texts, eos, special=False), pad, train_steps)
    model.eval().save_pretrained(str(folder))
    return folder


def _marian(tokenizer, hidden: int, layers: int, heads: int, positions: int) -> MarianMTModel:
    pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
    vocab = tokenizer.get_vocab_size()
    # Start token = pad, as the opus-mt checkpoints have it.
    return MarianMTModel(MarianConfig(
        vocab_size=vocab, decoder_vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=hidden * 2,
        decoder_ffn_dim=hidden * 2, max_position_embeddings=positions, scale_embedding=True, pad_token_id=pad,
        eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=None))


def build_marian(folder: Path, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 300,
                 positions: int = 128, train_steps: int = 200, seed: int = 0) -> Path:
    """A Marian (Unigram tokenizer closing each text with </s>, sinusoidal positions, scaled embeddings)
    that has learnt a little of copying stdlib snippets."""
    torch.manual_seed(seed)
    texts = _docstrings(seed)
    tokenizer = _tokenizer(folder, "unigram", vocab, texts)
    model = _marian(tokenizer, hidden, layers, heads, positions)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.5)
    if train_steps:
        pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
        _train(model, _copy_pairs(tokenizer, texts, eos, special=True), pad, train_steps)
    model.eval().save_pretrained(str(folder))
    return folder


def build_translating_marian(folder: Path, train_steps: int = 300, seed: int = 0) -> Path:
    """A Marian that translates a sentence of code words into number words (`translate`). Its tokenizer
    learns from docstrings too, so words split into subwords as a real vocabulary splits them."""
    torch.manual_seed(seed)
    texts = training_sentences(seed)
    corpus = _docstrings(seed, 200) + texts[:1000] + [translate(t) for t in texts[:1000]]
    tokenizer = _tokenizer(folder, "unigram", 300, corpus)
    pad = tokenizer.token_to_id("<pad>")
    model = _marian(tokenizer, hidden=64, layers=2, heads=4, positions=64)
    pairs = [(tokenizer.encode(t).ids, tokenizer.encode(translate(t)).ids) for t in texts]
    _train(model, pairs, pad, train_steps, lr=3e-3, batch=32)
    model.eval().save_pretrained(str(folder))
    return folder
