"""The generation engine on a CUDA device: bf16 by default, greedy output equal to transformers' `generate`
on the same device up to bf16's near-ties, the engine stepping on its own thread. These need a GPU and
report themselves skipped without one (`make bench-gpu` measures the speed there)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import GenerationRequest, Generator
from fastserve.services.inference.sampling_params import SamplingParams
from tests.support.tiny_models import build_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# bf16 keeps 8 bits of mantissa: where generate's two best logits are closer than this, a batched kernel's
# different summation order may pick the other one, and both continuations are then right.
NEAR_TIE = 0.05
NEW = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_causal_lm(tmp_path_factory.mktemp("cuda") / "gpt", hidden=128, layers=2, heads=4, vocab=512,
                           train_steps=150)


def reference(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """generate's greedy tokens and, at each, the margin between its two best logits."""
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    margins = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), margins


def test_greedy_on_cuda_equals_generate_up_to_bf16_near_ties(folder):
    generator = Generator("cuda", folder, "", GenerationSettings(max_batch_size=8))
    try:
        assert generator.engine.runner.decoder.dtype == torch.bfloat16  # the default on CUDA
        assert generator.engine.own_thread
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).to("cuda").eval()
        prompts = [[5 + i, 17 + 3 * i, 40 + i, 99, 7 * i + 1] for i in range(8)]
        params = SamplingParams(max_new_tokens=NEW)
        groups = [generator.submit(GenerationRequest(token_ids=p, params=params, max_new_tokens_set=True))
                  for p in prompts]
        compared = 0
        for prompt, seqs in zip(prompts, groups, strict=True):
            [completion], _ = generator.complete(seqs, None)
            expected, margins = reference(model, prompt)
            for ours, theirs, margin in zip(completion.token_ids, expected, margins, strict=True):
                if margin < NEAR_TIE:
                    break  # a near-tie: past it the two runs may rightly differ
                assert ours == theirs, (prompt, completion.token_ids, expected)
                compared += 1
        assert compared >= NEW * len(prompts) // 2  # the comparison covered most tokens
    finally:
        generator.drain()
