"""Greedy float32 output equals HF transformers' on the real SmolLM2 model."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import resolve_model

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea, there lived",
    "The three laws of thermodynamics state that",
    "Here is a list of the largest cities in Europe:\n1.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_greedy() -> list[list[int]]:
    transformers = pytest.importorskip("transformers")
    path = resolve_model("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop, never suppress EOS
    outs = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            gen = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="smollm2-135m", dtype="float32", num_kv_blocks=1024)


def test_greedy_matches_hf_one_by_one(llm, hf_greedy):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for prompt, expected in zip(PROMPTS, hf_greedy, strict=True):
        out = llm.generate(prompt, params)[0]
        assert out.token_ids == expected, prompt


def test_greedy_matches_hf_as_one_batch_of_different_lengths(llm, hf_greedy):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == hf_greedy
    assert len({len(o.prompt_token_ids) for o in outs}) > 3  # really different lengths
