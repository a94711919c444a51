"""The HF transformers baseline: `generate` over padded static batches of the same requests.

The HF model is `transformers.LlamaForCausalLM` holding the very weights splitserve
serves (our HF-named state dict), in the same dtype. Each batch is left-padded
with an attention mask and decoded greedily for exactly its longest member's
requested length (`min_new_tokens == max_new_tokens`): a padded batcher cannot
stop a finished row early. Only each request's requested tokens count as output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench.workloads import Workload, batches, tokens_per_s
from engine.config import ModelConfig
from engine.engine_config import DTYPES
from engine.errors import InvalidRequestError
from engine.loader import load_config, load_state_dict, resolve_model


@dataclass(frozen=True, slots=True)
class HFRun:
    seconds: float
    useful_tokens: int  # the requested lengths, summed
    decoded_tokens: int  # every row of every batch, padding rows included

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_s(self.useful_tokens, self.seconds)


def hf_llama_config(cfg: ModelConfig, dtype: torch.dtype):
    """A `transformers.LlamaConfig` with our model's shape."""
    from transformers import LlamaConfig

    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        rope_parameters=rope,
        dtype=dtype,
    )


def load_hf_model(model: str, dtype: str):
    """HF `LlamaForCausalLM` (sdpa attention) with splitserve's weights for `model`."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise InvalidRequestError(
            "experiment vs_hf needs transformers: pip install 'transformers>=4.45'"
        ) from None
    path = resolve_model(model)
    cfg = load_config(path)
    if cfg.architecture != "llama":
        raise InvalidRequestError(f"vs_hf supports llama models, not {cfg.architecture}")
    torch_dtype = DTYPES[dtype]
    hf_config = hf_llama_config(cfg, torch_dtype)
    hf_config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_config).to(torch_dtype)  # type: ignore[arg-type]
    missing, unexpected = hf.load_state_dict(load_state_dict(path, cfg, torch_dtype), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"HF model weights do not match: {missing=} {unexpected=}")
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.eval()


def left_pad(prompts: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [B, longest], padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


class _ProgressStreamer:
    """A `generate` streamer that only advances a progress bar by one row per new token."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # the first put is the prompt
            self._seen_prompt = True
            return
        self.bar.update(value.shape[0])

    def end(self) -> None:
        self._seen_prompt = False


@torch.inference_mode()
def run_hf_generate(
    hf, workload: Workload, batch_size: int, eos_id: int, pad_id: int, progress: bool = True
) -> HFRun:
    """Generate the workload in padded batches of `batch_size`; time the whole run."""
    groups = list(
        zip(
            batches(workload.prompts, batch_size),
            batches(workload.output_lens, batch_size),
            strict=True,
        )
    )
    total = sum(max(lens) * len(lens) for _, lens in groups)
    bar = tqdm(total=total, disable=not progress, desc=f"hf {workload.name}", unit="tok")
    decoded, t0 = 0, time.perf_counter()
    for prompts, lens in groups:
        ids, mask = left_pad(prompts, pad_id)
        n = max(lens)
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            use_cache=True,
            streamer=_ProgressStreamer(bar) if progress else None,
        )
        decoded += (out.shape[1] - ids.shape[1]) * len(prompts)
    seconds = time.perf_counter() - t0
    bar.close()
    return HFRun(seconds, workload.output_tokens, decoded)
