"""The GPU-target cost model's inputs (sim.hardware): derived model quantities against hand
arithmetic, name lookups and their one-line errors, and the roofline step's regimes."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError
from sim.hardware import (
    GPUS,
    MODELS,
    STEP_OVERHEAD_S,
    kv_capacity_tokens,
    kv_transfer_s,
    lookup_gpu,
    lookup_model,
    step_cost,
    step_time_s,
)

H100 = GPUS["H100-SXM-80GB"]
L8B = MODELS["Llama-3-8B"]
L70B = MODELS["Llama-3-70B"]
SMOL = MODELS["SmolLM2-135M"]


def test_kv_bytes_per_token_in_bf16() -> None:
    assert L8B.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert L70B.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327680
    assert SMOL.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23040


def test_params_match_config_shapes() -> None:
    def llama_params(layers: int, hidden: int, kv_dim: int, ffn: int, vocab: int, tied: bool):
        attn = 2 * hidden * hidden + 2 * hidden * kv_dim
        layer = attn + 3 * hidden * ffn + 2 * hidden  # + two RMSNorms
        return layers * layer + vocab * hidden * (1 if tied else 2) + hidden

    assert L8B.params_b * 1e9 == pytest.approx(llama_params(32, 4096, 1024, 14336, 128256, False))
    assert L70B.params_b * 1e9 == pytest.approx(llama_params(80, 8192, 1024, 28672, 128256, False))
    assert SMOL.params_b * 1e9 == pytest.approx(llama_params(30, 576, 192, 1536, 49152, True))
    assert SMOL.hidden == SMOL.heads * SMOL.head_dim and L8B.hidden == L8B.heads * L8B.head_dim


def test_weights_and_flops_per_token() -> None:
    assert L8B.weight_bytes == pytest.approx(16.06e9, rel=1e-3)  # 8.03 B params * 2 bytes
    assert L70B.weight_bytes == pytest.approx(141.1e9, rel=1e-3)
    assert L8B.flops_per_token == pytest.approx(2 * 8.030261248e9)
    # QK^T and PV: 4 * layers * heads * head_dim flops per key; 8B at 1,000 keys = 524,288,000
    assert L8B.attention_flops(1000) == 4 * 32 * 32 * 128 * 1000
    assert L8B.attention_flops(0) == 0


def test_datasheet_figures_are_dense_and_sourced() -> None:
    assert H100.dense_bf16_tflops == pytest.approx(1979 / 2)  # datasheet 1,979 is with sparsity
    assert GPUS["H200-SXM-141GB"].hbm_bandwidth_gbs == 4800
    assert GPUS["A100-SXM-80GB"].dense_bf16_tflops == 312
    assert GPUS["L40S"].hbm_bandwidth_gbs == 864
    for entry in [*GPUS.values(), *MODELS.values()]:
        assert entry.source, entry.name
    assert all("assumption" in g.source for g in GPUS.values())  # prices are flagged


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("h100", "H100-SXM-80GB"),
        ("H100-80GB", "H100-SXM-80GB"),
        ("h100_sxm", "H100-SXM-80GB"),
        ("NVIDIA H100", "H100-SXM-80GB"),
        ("H200", "H200-SXM-141GB"),
        ("a100-sxm-80gb", "A100-SXM-80GB"),
        ("l40s", "L40S"),
    ],
)
def test_lookup_gpu_aliases(name: str, expected: str) -> None:
    assert lookup_gpu(name) is GPUS[expected]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama-3-8b", "Llama-3-8B"),
        ("meta-llama/Meta-Llama-3-8B", "Llama-3-8B"),
        ("meta-llama/Meta-Llama-3-70B-Instruct", "Llama-3-70B"),
        ("LLAMA3-70B", "Llama-3-70B"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M"),
    ],
)
def test_lookup_model_aliases(name: str, expected: str) -> None:
    assert lookup_model(name) is MODELS[expected]


def test_unknown_names_are_one_line_errors_listing_the_known() -> None:
    with pytest.raises(InvalidRequestError) as gpu_err:
        lookup_gpu("B300")
    message = str(gpu_err.value)
    assert "\n" not in message and "'B300'" in message
    assert all(name in message for name in GPUS)
    with pytest.raises(InvalidRequestError) as model_err:
        lookup_model("mistral-7b")
    message = str(model_err.value)
    assert "\n" not in message and "'mistral-7b'" in message
    assert all(name in message for name in MODELS)


def test_small_decode_batch_is_memory_bound() -> None:
    cost = step_cost(H100, L8B, 1, batch_tokens=8, decode_seqs=8, mean_context=1000)
    assert cost.bound == "memory"
    # 16.06 GB of weights + 8 * 1000 * 131072 B of KV + 8 new tokens' KV at 0.7 * 3.35 TB/s
    hbm_bytes = L8B.weight_bytes + 8 * 1000 * 131072 + 8 * 131072
    assert cost.memory_s == pytest.approx(hbm_bytes / (0.7 * 3350e9))
    assert cost.total_s == pytest.approx(cost.memory_s + STEP_OVERHEAD_S)
    assert 0.006 < cost.total_s < 0.010  # ~7.3 ms + 1 ms


def test_large_prefill_batch_is_compute_bound() -> None:
    cost = step_cost(H100, L8B, 1, batch_tokens=8192, decode_seqs=0, mean_context=2048)
    assert cost.bound == "compute"
    flops = 8192 * (2 * 8.030261248e9 + 4 * 32 * 32 * 128 * 2048)
    assert cost.compute_s == pytest.approx(flops / (0.5 * 989.5e12))
    assert cost.compute_s > 10 * cost.memory_s


def test_step_time_is_monotone_in_batch() -> None:
    for decode_seqs in (True, False):
        times = [
            step_time_s(H100, L8B, 1, n, n if decode_seqs else 0, mean_context=1024)
            for n in (1, 2, 8, 32, 128, 512, 2048, 8192)
        ]
        assert times == sorted(times) and times[0] < times[-1]


@pytest.mark.parametrize(
    ("model", "tokens", "decode_seqs", "context"),
    [(L8B, 8192, 0, 2048), (L70B, 32, 32, 2000), (L70B, 4096, 0, 1024)],
)
def test_tp2_roughly_halves_a_step(model, tokens: int, decode_seqs: int, context: int) -> None:
    one = step_time_s(H100, model, 1, tokens, decode_seqs, context)
    two = step_time_s(H100, model, 2, tokens, decode_seqs, context)
    assert 0.45 < two / one < 0.6  # half, plus the all-reduce and the fixed overhead


def test_efficiency_factors_scale_their_own_regime() -> None:
    decode = dict(batch_tokens=8, decode_seqs=8, mean_context=1000)
    assert step_cost(H100, L8B, 1, **decode, mbu=0.35).memory_s == pytest.approx(
        2 * step_cost(H100, L8B, 1, **decode, mbu=0.7).memory_s
    )
    assert step_time_s(H100, L8B, 1, **decode, mfu=0.25) == pytest.approx(
        step_time_s(H100, L8B, 1, **decode, mfu=0.5)
    )  # decode at batch 8 does not care about MFU


def test_h200_decodes_faster_than_h100_by_its_bandwidth() -> None:
    args = (L70B, 2, 16, 16, 2000)
    h100 = step_cost(H100, *args).memory_s
    h200 = step_cost(GPUS["H200-SXM-141GB"], *args).memory_s
    assert h100 / h200 == pytest.approx(4800 / 3350)


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_gpus_tp=0, batch_tokens=1, decode_seqs=1, mean_context=1),
        dict(num_gpus_tp=1, batch_tokens=0, decode_seqs=0, mean_context=1),
        dict(num_gpus_tp=1, batch_tokens=4, decode_seqs=5, mean_context=1),
        dict(num_gpus_tp=1, batch_tokens=4, decode_seqs=4, mean_context=-1),
        dict(num_gpus_tp=1, batch_tokens=4, decode_seqs=4, mean_context=1, mfu=0),
    ],
)
def test_step_rejects_impossible_arguments(bad: dict) -> None:
    with pytest.raises(ValueError):
        step_time_s(H100, L8B, **bad)


def test_kv_transfer_time() -> None:
    # 4,096 tokens of 70B KV = 1.342 GB over one 400 Gb/s NIC (50 GB/s): 26.8 ms
    assert kv_transfer_s(L70B, 4096, H100.network_gbs) == pytest.approx(4096 * 327680 / 50e9)
    assert kv_transfer_s(L70B, 0, 50) == 0
    with pytest.raises(ValueError):
        kv_transfer_s(L70B, 10, 0)


def test_kv_capacity_after_weights() -> None:
    # 80 GB * 0.9 - 16.06 GB of weights = 55.9 GB / 131072 B = ~426k tokens
    assert kv_capacity_tokens(H100, L8B, 1, 0.9) == int((72e9 - L8B.weight_bytes) // 131072)
    assert kv_capacity_tokens(H100, L70B, 1, 0.9) == 0  # 141 GB of weights do not fit
    assert kv_capacity_tokens(H100, L70B, 2, 0.9) > 0
