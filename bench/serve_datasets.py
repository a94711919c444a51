"""Prompts for `splitserve bench serve`: random, synthetic-chat, jsonl.

A sample is a prompt plus the number of tokens to ask for. The prompt is token ids when
the endpoint takes them and exact lengths are wanted (random, completions/gRPC), else text.

random          exactly --random-input-len token ids drawn uniformly from the plain vocabulary
                (ids FIRST_PLAIN_TOKEN_ID..vocab-1); for chat, about that many random words
synthetic-chat  lognormal prompt and output lengths with the given means and sigma
                (mu = ln(mean) - sigma^2/2, so the mean is the mean), prompts of random words
jsonl           one {"prompt": str, "output_len": int} per line
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.workloads import FIRST_PLAIN_TOKEN_ID
from engine.errors import InvalidRequestError

DATASETS = ("random", "synthetic-chat", "jsonl")

# Common short English words: most are one token in Llama-family BPE vocabularies.
_WORD_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class Sample:
    prompt: str | list[int]
    output_len: int
    prompt_len: int | None = None  # exact for token ids, approximate (words) for text


def random_text(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS, size=max(1, n_words)).tolist())


def _positive(name: str, value: float) -> None:
    if value is None or value <= 0:
        raise InvalidRequestError(f"{name} must be positive, got {value}")


def load_samples(
    dataset: str,
    num_prompts: int,
    *,
    token_ids: bool,
    seed: int = 0,
    dataset_path: Path | str | None = None,
    random_input_len: int = 128,
    random_output_len: int = 128,
    vocab_size: int = 49152,
    mean_input_len: float = 256,
    mean_output_len: float = 128,
    sigma: float = 0.5,
) -> list[Sample]:
    """`num_prompts` samples of `dataset`; `token_ids`: prompts as ids where the dataset can."""
    _positive("--num-prompts", num_prompts)
    rng = np.random.default_rng(seed)
    if dataset == "random":
        _positive("--random-input-len", random_input_len)
        _positive("--random-output-len", random_output_len)
        if vocab_size <= FIRST_PLAIN_TOKEN_ID:
            raise InvalidRequestError(f"--vocab-size must exceed {FIRST_PLAIN_TOKEN_ID}")
        out = []
        for _ in range(num_prompts):
            if token_ids:
                ids = rng.integers(FIRST_PLAIN_TOKEN_ID, vocab_size, size=random_input_len)
                out.append(Sample(ids.tolist(), random_output_len, random_input_len))
            else:
                text = random_text(rng, random_input_len)
                out.append(Sample(text, random_output_len, random_input_len))
        return out
    if dataset == "synthetic-chat":
        _positive("--mean-input-len", mean_input_len)
        _positive("--mean-output-len", mean_output_len)
        if sigma < 0:
            raise InvalidRequestError(f"--sigma must be >= 0, got {sigma}")

        def lognormal(mean: float) -> int:
            mu = math.log(mean) - sigma * sigma / 2
            return max(1, round(float(rng.lognormal(mu, sigma))))

        out = []
        for _ in range(num_prompts):
            n_in, n_out = lognormal(mean_input_len), lognormal(mean_output_len)
            out.append(Sample(random_text(rng, n_in), n_out, n_in))
        return out
    if dataset == "jsonl":
        return _load_jsonl(dataset_path, num_prompts)
    raise InvalidRequestError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _load_jsonl(path: Path | str | None, num_prompts: int) -> list[Sample]:
    if not path:
        raise InvalidRequestError("--dataset jsonl needs --dataset-path FILE")
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"dataset file {str(path)!r} does not exist")
    out: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, output_len = row["prompt"], int(row["output_len"])
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidRequestError(
                    f'{path}:{lineno}: expected {{"prompt": str, "output_len": int}} ({exc})'
                ) from None
            if not isinstance(prompt, str) or not prompt or output_len <= 0:
                raise InvalidRequestError(
                    f"{path}:{lineno}: need a non-empty prompt and a positive output_len"
                )
            out.append(Sample(prompt, output_len))
            if len(out) == num_prompts:
                break
    if not out:
        raise InvalidRequestError(f"dataset file {str(path)!r} has no prompts")
    if len(out) < num_prompts:  # cycle, as vLLM does with too-small datasets
        out = [out[i % len(out)] for i in range(num_prompts)]
    return out
