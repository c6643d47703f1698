"""Which dtype a generation model is served in: with none named, fp32 on every CPU (bf16 only on a CUDA
GPU), so that a float32 checkpoint answers as its own generate() does; a named dtype is used whatever the
CPU, and `cpu_has_bf16` tells where bf16 is worth asking for (AVX-512 BF16 or AMX; emulated bf16 is far
slower). The CPU's capabilities are replaced here so both kinds of CPU are covered on any machine; the
models are real (tiny, random weights) and really generate."""

from __future__ import annotations

from types import MappingProxyType

import pytest
import torch

from fastserve.models.loading import AUTO, auto_dtype, cpu_has_bf16, torch_dtype
from fastserve.runtime.errors import InvalidArgument
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import GenerationRequest, Generator
from fastserve.services.inference.sampling_params import SamplingParams
from tests.support.tiny_models import build_causal_lm

AVX2 = MappingProxyType({"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False,
                         "amx_bf16": False})
AVX512_BF16 = MappingProxyType(dict(AVX2) | {"avx512_f": True, "avx512_bf16": True})
AMX = MappingProxyType(dict(AVX2) | {"amx_tile": True, "amx_bf16": True})
CPU = torch.device("cpu")
NEW = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_causal_lm(tmp_path_factory.mktemp("dtype") / "gpt", hidden=64, layers=2, vocab=300, train_steps=0)


def cpu_with(monkeypatch, caps) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


@pytest.mark.parametrize(("caps", "has_bf16"), [(AVX2, False), (AVX512_BF16, True), (AMX, True)])
def test_auto_is_fp32_on_every_cpu_and_bf16_hardware_is_told(monkeypatch, caps, has_bf16):
    cpu_with(monkeypatch, caps)
    assert cpu_has_bf16() is has_bf16
    assert auto_dtype(CPU) is torch.float32
    assert torch_dtype(AUTO, CPU) is torch.float32


def test_named_dtypes_are_kept_whatever_the_cpu(monkeypatch):
    for caps in (AVX2, AVX512_BF16):
        cpu_with(monkeypatch, caps)
        assert torch_dtype("fp32", CPU) is torch.float32
        assert torch_dtype("bf16", CPU) is torch.bfloat16
        assert torch_dtype("", CPU) is torch.float32  # encoders' default stays fp32
    with pytest.raises(InvalidArgument, match="auto"):
        torch_dtype("int8", CPU)


def generate(generator: Generator, prompt: list[int]) -> list[int]:
    seqs = generator.submit(GenerationRequest(token_ids=prompt, params=SamplingParams(max_new_tokens=NEW),
                                              max_new_tokens_set=True))
    [completion], _ = generator.complete(seqs, None)
    return completion.token_ids


@pytest.mark.parametrize(("caps", "named", "expected"), [
    (AVX2, "", torch.float32),  # no bf16 hardware: fp32 unless forced
    (AVX2, "bf16", torch.bfloat16),  # forced
    (AVX512_BF16, "", torch.float32),  # bf16 hardware: still fp32 by default
    (AVX512_BF16, "bf16", torch.bfloat16),  # asked for
])
def test_generator_loads_and_generates_in_the_chosen_dtype(monkeypatch, folder, caps, named, expected):
    cpu_with(monkeypatch, caps)
    generator = Generator("gpt", folder, named, GenerationSettings(max_batch_size=4))
    try:
        runner = generator.engine.runner
        assert runner.decoder.dtype is expected
        assert all(p.dtype is expected for p in runner.decoder.model.parameters() if p.is_floating_point())
        assert runner.cache.keys[0].dtype is expected  # the KV cache follows the weights
        ids = generate(generator, [5, 17, 40, 99, 7])
        assert len(ids) == NEW and all(0 <= t < generator.vocab_size for t in ids)
    finally:
        generator.drain()


def test_fp32_greedy_equals_generate_and_bf16_is_close(monkeypatch, folder):
    """fp32 keeps greedy parity with transformers' generate; bf16 (what a bf16 CPU is worth asking for) is
    compared with generate in bf16: its first token, whose logits no earlier rounding has moved, agrees."""
    from transformers import AutoModelForCausalLM

    cpu_with(monkeypatch, AVX2)
    prompt = [5, 17, 40, 99, 7]
    for named, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        generator = Generator("gpt", folder, named, GenerationSettings(max_batch_size=4))
        try:
            ours = generate(generator, prompt)
        finally:
            generator.drain()
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        with torch.inference_mode():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        if dtype is torch.float32:
            assert ours == theirs
        else:
            assert ours[0] == theirs[0]
