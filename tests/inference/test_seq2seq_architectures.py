"""BART and Marian encoder-decoders in the generation engine (bart_decoder.py): greedy decoding equals
transformers' generate for sources of different lengths decoded together in one engine, the folders are
read as seq2seq with their start and end tokens from config and generation_config.json, and a tiny Marian
trained here to translate serves `Generate` from a real inference server, text in and text out."""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSeq2SeqLM

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.models.kinds import SEQ2SEQ, default_task, model_kind
from fastserve.runtime.errors import InvalidArgument
from fastserve.services.inference.bart_decoder import BartDecoder
from fastserve.services.inference.decoder import open_decoder
from fastserve.services.inference.engine import Engine
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import GenerationRequest, Generator
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.sequence import Finish
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import serving_models
from tests.support.rpc import field_of
from tests.support.tiny_seq2seq import (
    build_bart,
    build_marian,
    build_translating_marian,
    sentences,
    training_sentences,
    translate,
)

FAMILIES = ("bart", "marian")
BUILDERS = {"bart": build_bart, "marian": build_marian}
# Code-word sentences the round trip translates, none of them one the model was trained on.
ROUND_TRIP = [s for s in sentences(200, seed=99, shortest=3, longest=4) if s not in set(training_sentences())][:8]
# Sources of different lengths for the parity tests.
SOURCES = ["Return the number of items in the container.", "x", "Create a new socket using the given address "
           "family.", "If the file is closed, raise ValueError.", "This module provides", "Return True if the "
           "object is callable, and False if not; classes are callable.", "Open the file."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    return {family: BUILDERS[family](root / family) for family in FAMILIES}


@functools.cache
def reference_model(folder: Path):
    return AutoModelForSeq2SeqLM.from_pretrained(str(folder)).eval()


def sources(folder: Path) -> list[list[int]]:
    """Texts of different lengths as the generator tokenizes a source (Marian's closing </s> included)."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tokenizer.encode(text).ids for text in SOURCES]


def hf_greedy(model, source: list[int], n: int, eos: bool) -> list[int]:
    """transformers' greedy generate, without its start token and cut before its EOS as the engine stops."""
    ids = torch.tensor([source])
    options = {} if eos else {"eos_token_id": None}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, num_beams=1,
                         **options)[0, 1:].tolist()
    end = model.generation_config.eos_token_id
    return out[:out.index(end)] if eos and end in out else out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_matches_generate_with_sources_decoded_together(folders, family):
    model = reference_model(folders[family])
    decoder = open_decoder(model)
    assert isinstance(decoder, BartDecoder) and decoder.encoder_decoder
    eng = Engine(family, decoder, GenerationSettings(max_batch_size=4, max_prefill_tokens=16), set(),
                 lambda ids: "")
    work = [(s, 6 + 5 * i) for i, s in enumerate(sources(folders[family]))]
    seqs = [eng.submit(s, SamplingParams(max_new_tokens=n, logprobs=True)) for s, n in work]
    assert all(seq.done.wait(120) for seq in seqs)
    eng.drain()
    for (source, n), seq in zip(work, seqs, strict=True):
        assert seq.finish is Finish.LENGTH and seq.generated == hf_greedy(model, source, n, eos=False)
        assert seq.prompt_tokens == len(source)
    assert max(eng.stats.batch_sizes) > 1  # sequences really shared decode steps
    # The distributions differ between sources: a decoder that ignored the encoder states would give each source
    # the same logprobs at each step (the tokens alone prove nothing: a briefly trained model may pick the same).
    spread = max(max(seq.logprobs[i].logprob for seq in seqs) - min(seq.logprobs[i].logprob for seq in seqs)
                 for i in range(6))
    assert spread > 1e-5  # float32 noise on equal inputs is ~1e-7; the briefly trained BART gives ~1.6e-4


def test_the_final_logits_bias_counts(folders):
    """The builders give final_logits_bias random values: logits without it would be another model's."""
    model = reference_model(folders["marian"])
    decoder = open_decoder(model)
    hidden = torch.randn(3, model.config.d_model)
    with torch.inference_mode():
        assert torch.allclose(decoder.logits(hidden) - model.lm_head(hidden), model.final_logits_bias.expand(3, -1))
    assert model.final_logits_bias.abs().max() > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_folders_are_seq2seq_with_start_and_end_tokens_from_their_configs(folders, family):
    folder = folders[family]
    assert model_kind(folder) == SEQ2SEQ and default_task(folder) == "generation"
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    gen = Generator(family, folder, "", GenerationSettings(max_batch_size=4))
    try:
        assert gen.engine.start_id == generation["decoder_start_token_id"] == config["decoder_start_token_id"]
        assert gen.engine.scheduler.eos_ids == {generation["eos_token_id"]}
        model = reference_model(folder)
        source = sources(folder)[2]
        seqs = gen.submit(GenerationRequest(token_ids=source, params=SamplingParams(max_new_tokens=30),
                                            max_new_tokens_set=True))
        [completion], usage = gen.complete(seqs, None)
        ids, finish = completion.token_ids, completion.finish
        expected = hf_greedy(model, source, 30, eos=True)
        assert ids == expected and finish is (Finish.LENGTH if len(expected) == 30 else Finish.EOS)
        assert usage.prompt_tokens == len(source)
        with pytest.raises(InvalidArgument) as refused:
            gen.prompt_ids(GenerationRequest(token_ids=[5] * (gen.max_prompt + 1)))
        assert field_of(refused.value) == "token_ids.ids"
    finally:
        gen.drain()


@pytest.fixture(scope="module")
def translator(tmp_path_factory) -> Path:
    """A store home holding the translating Marian; returns the home."""
    home = tmp_path_factory.mktemp("translate") / "home"
    with ArtifactStore(home / "artifacts").publish("models", "tiny-translator") as draft:
        build_translating_marian(draft.path)
    return home


@pytest.fixture(scope="module")
def server(translator, tmp_path_factory):
    with serving_models(translator, tmp_path_factory.mktemp("l") / "inf.log",
                        {"translator": "artifact://models/tiny-translator/1"}) as proc:
        yield proc


def test_marian_translation_round_trip_through_the_server(stub, translator):
    requests = [pb.GenerateRequest(model="translator", text=s, sampling=pb.SamplingParams(max_new_tokens=24))
                for s in ROUND_TRIP]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(stub.Generate, requests))
    assert [r.text for r in replies] == [translate(s) for s in ROUND_TRIP]
    assert all(r.finish_reason == pb.FINISH_REASON_EOS for r in replies)
    folder = ArtifactStore(translator / "artifacts").resolve("artifact://models/tiny-translator/1").path
    tokenizer, model = Tokenizer.from_file(str(folder / "tokenizer.json")), reference_model(folder)
    for source, reply in zip(ROUND_TRIP, replies, strict=True):
        ids = tokenizer.encode(source).ids
        assert ids[-1] == tokenizer.token_to_id("</s>")  # the source went in as Marian's tokenizer writes it
        assert reply.usage.prompt_tokens == len(ids)
        assert list(reply.token_ids) == hf_greedy(model, ids, 24, eos=True)


def test_a_source_over_the_encoders_window_is_refused_naming_the_field(stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(model="translator", text=" ".join(["alpha"] * 80),
                                         sampling=pb.SamplingParams(max_new_tokens=4)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(refused.value) == "text"
