"""Published figures for GPU targets and models, and the roofline cost of one engine step.

The simulator's second cost model (issue 14): what a step costs on hardware we do not have,
built from datasheets and config.json files instead of measurements. Every figure names its
source in `source`; every assumption says so.

    one step of a tensor-parallel group (TP GPUs, bf16):
      compute = tokens * (2 * params + attention flops at the context) / (TP * peak * MFU)
      memory  = (weights + decode KV read + new KV written) / (TP * HBM bandwidth * MBU)
      step    = max(compute, memory) + TP all-reduce over NVLink + STEP_OVERHEAD_S
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import InvalidRequestError

# Efficiency factors: the share of datasheet peak a serving engine reaches. Assumptions, not
# published constants. MBU (model bandwidth utilization) is defined in Databricks/MosaicML,
# "LLM Inference Performance Engineering: Best Practices" (2023); tuned CUDA stacks (vLLM,
# TensorRT-LLM) are commonly reported at 60-85% MBU in decode, so 0.7. MFU (PaLM, Chowdhery et
# al. 2022) of large prefill GEMMs in bf16 is typically 40-60% of dense peak, so 0.5.
MFU = 0.5
MBU = 0.7
# Assumption: scheduling, sampling, detokenization and kernel launches per step (CUDA graphs
# on); a fixed cost the fitted CPU model measures directly and this one can only guess.
STEP_OVERHEAD_S = 1e-3


@dataclass(frozen=True, slots=True)
class GPU:
    name: str
    hbm_gb: float
    hbm_bandwidth_gbs: float  # GB/s (1e9 bytes)
    dense_bf16_tflops: float  # dense tensor-core peak, not the 2:4-sparsity figure
    nvlink_gbs: float  # GPU-to-GPU in one node, per direction per GPU
    network_gbs: float  # scale-out NIC bandwidth per GPU, typical for the system
    price_per_hour_usd: float  # assumption: typical on-demand cloud price per GPU
    source: str


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    params_b: float  # billions, counted from config.json (embeddings included)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    source: str
    dtype_bytes: int = 2  # bf16 weights and KV

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes  # K and V

    @property
    def flops_per_token(self) -> float:
        """Forward matmul FLOPs per token, 2 * params (one multiply-add per weight)."""
        return 2 * self.params_b * 1e9

    def attention_flops(self, context: float) -> float:
        """Per token attending to `context` earlier tokens: QK^T and PV, 2 * 2 * heads *
        head_dim per layer per key (PaLM, Chowdhery et al. 2022, App. B: 6N + 12LHQT training
        FLOPs per token, of which the forward pass is 2N + 4LHQT)."""
        return 4 * self.layers * self.heads * self.head_dim * context


# fmt: off
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU(name="H100-SXM-80GB", hbm_gb=80, hbm_bandwidth_gbs=3350, dense_bf16_tflops=989.5,
        nvlink_gbs=450, network_gbs=50, price_per_hour_usd=2.99,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM): 80 GB HBM3, 3.35 TB/s, "
        "BF16 1,979 TFLOPS with sparsity = 989.5 dense (Hopper whitepaper: 989.4), "
        "NVLink 900 GB/s total = 450 per direction; NVIDIA DGX H100 user guide: "
        "8x ConnectX-7 400 Gb/s, one per GPU = 50 GB/s; price: assumption, mid-range "
        "specialist-cloud on-demand list price 2025-26 ($2.49-3.99/GPU-h: Lambda, CoreWeave, "
        "RunPod)"),
    GPU(name="H200-SXM-141GB", hbm_gb=141, hbm_bandwidth_gbs=4800, dense_bf16_tflops=989.5,
        nvlink_gbs=450, network_gbs=50, price_per_hour_usd=3.79,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, "
        "BF16 1,979 TFLOPS with sparsity = 989.5 dense (same GH100 die as H100), "
        "NVLink 900 GB/s total = 450 per direction; HGX/DGX H200: 8x ConnectX-7 400 Gb/s "
        "= 50 GB/s per GPU; price: assumption, ~1.25x the H100 on-demand figure"),
    GPU(name="A100-SXM-80GB", hbm_gb=80, hbm_bandwidth_gbs=2039, dense_bf16_tflops=312,
        nvlink_gbs=300, network_gbs=25, price_per_hour_usd=1.79,
        source="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): HBM2e 2,039 GB/s, "
        "BF16 312 TFLOPS dense (624 with sparsity), NVLink 600 GB/s total = 300 per "
        "direction; DGX A100: 8x ConnectX-6 HDR 200 Gb/s = 25 GB/s per GPU; "
        "price: assumption, specialist-cloud on-demand range $1.49-2.49/GPU-h"),
    GPU(name="L40S", hbm_gb=48, hbm_bandwidth_gbs=864, dense_bf16_tflops=362.05,
        nvlink_gbs=32, network_gbs=6.25, price_per_hour_usd=0.87,
        source="NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS dense "
        "(733 with sparsity), no NVLink: PCIe Gen4 x16 64 GB/s bidirectional = 32 per "
        "direction; network: assumption, 400 Gb/s shared by 8 GPUs as in AWS g6e.48xlarge "
        "= 6.25 GB/s per GPU; price: assumption, ~$0.87/GPU-h on-demand "
        "(aihardwareindex.com, Dec 2025)"),
)}

MODELS: dict[str, Model] = {m.name: m for m in (
    Model(name="Llama-3-8B", params_b=8.030261248, layers=32, hidden=4096, heads=32,
          kv_heads=8, head_dim=128, vocab=128256,
          source="meta-llama/Meta-Llama-3-8B config.json: 32 layers, hidden 4096, 32 heads, "
          "8 KV heads, intermediate 14336, vocab 128256, untied embeddings, bf16; "
          "8,030,261,248 params counted from those shapes"),
    Model(name="Llama-3-70B", params_b=70.553706496, layers=80, hidden=8192, heads=64,
          kv_heads=8, head_dim=128, vocab=128256,
          source="meta-llama/Meta-Llama-3-70B config.json: 80 layers, hidden 8192, 64 heads, "
          "8 KV heads, intermediate 28672, vocab 128256, untied embeddings, bf16; "
          "70,553,706,496 params counted from those shapes"),
    Model(name="SmolLM2-135M", params_b=0.134515008, layers=30, hidden=576, heads=9,
          kv_heads=3, head_dim=64, vocab=49152,
          source="HuggingFaceTB/SmolLM2-135M config.json: 30 layers, hidden 576, 9 heads, "
          "3 KV heads, head_dim 64, intermediate 1536, vocab 49152, tied embeddings; "
          "134,515,008 params counted from those shapes"),
)}

_GPU_ALIASES = {
    "h100": "H100-SXM-80GB", "h100-sxm": "H100-SXM-80GB", "h100-80gb": "H100-SXM-80GB",
    "h100-sxm5": "H100-SXM-80GB", "h100-sxm5-80gb": "H100-SXM-80GB",
    "h200": "H200-SXM-141GB", "h200-sxm": "H200-SXM-141GB", "h200-141gb": "H200-SXM-141GB",
    "a100": "A100-SXM-80GB", "a100-sxm": "A100-SXM-80GB", "a100-80gb": "A100-SXM-80GB",
    "a100-sxm4-80gb": "A100-SXM-80GB", "l40s-48gb": "L40S",
}
_MODEL_ALIASES = {
    "llama-3-8b": "Llama-3-8B", "llama3-8b": "Llama-3-8B",
    "llama-3-70b": "Llama-3-70B", "llama3-70b": "Llama-3-70B",
    "smollm2-135m": "SmolLM2-135M", "smollm2": "SmolLM2-135M",
}
# fmt: on


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def lookup_gpu(name: str) -> GPU:
    """A GPU by name or alias, any case: "h100", "H100-80GB", "H200-SXM-141GB"."""
    key = _key(name).removeprefix("nvidia-")
    by_key = {_key(n): g for n, g in GPUS.items()}
    found = by_key.get(key) or GPUS.get(_GPU_ALIASES.get(key, ""))
    if found is None:
        raise InvalidRequestError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return found


def lookup_model(name: str) -> Model:
    """A model by name, alias or Hugging Face id: "llama-3-8b", "meta-llama/Meta-Llama-3-8B",
    "HuggingFaceTB/SmolLM2-135M-Instruct" (an -Instruct variant has the same shapes)."""
    key = _key(name).rsplit("/", 1)[-1].removeprefix("meta-").removesuffix("-instruct")
    by_key = {_key(n): m for n, m in MODELS.items()}
    found = by_key.get(key) or MODELS.get(_MODEL_ALIASES.get(key, ""))
    if found is None:
        raise InvalidRequestError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return found


@dataclass(frozen=True, slots=True)
class StepCost:
    """One engine step's time, by part, in seconds."""

    compute_s: float
    memory_s: float
    allreduce_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.allreduce_s + self.overhead_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def step_cost(
    gpu: GPU,
    model: Model,
    num_gpus_tp: int,
    batch_tokens: int,
    decode_seqs: int,
    mean_context: float,
    mfu: float = MFU,
    mbu: float = MBU,
) -> StepCost:
    """The parts of one step of a TP group running `batch_tokens` tokens, of which
    `decode_seqs` are decode tokens whose sequences' KV is read from HBM.

    `mean_context` is the mean number of earlier tokens each token in the step attends to:
    for a decode token, its sequence's length; for a prefill token of a p-token prompt, about
    p / 2. Prefill attention reads its own KV on chip (flash attention), so only decode
    sequences add KV reads to the HBM traffic; every new token writes its KV once.
    """
    _check_step(num_gpus_tp, batch_tokens, decode_seqs, mean_context, mfu, mbu)
    flops = batch_tokens * (model.flops_per_token + model.attention_flops(mean_context))
    hbm_bytes = (
        model.weight_bytes
        + decode_seqs * mean_context * model.kv_bytes_per_token
        + batch_tokens * model.kv_bytes_per_token
    )
    return StepCost(
        compute_s=flops / (num_gpus_tp * gpu.dense_bf16_tflops * 1e12 * mfu),
        memory_s=hbm_bytes / (num_gpus_tp * gpu.hbm_bandwidth_gbs * 1e9 * mbu),
        allreduce_s=allreduce_s(gpu, model, num_gpus_tp, batch_tokens),
        overhead_s=STEP_OVERHEAD_S,
    )


def step_time_s(
    gpu: GPU,
    model: Model,
    num_gpus_tp: int,
    batch_tokens: int,
    decode_seqs: int,
    mean_context: float,
    mfu: float = MFU,
    mbu: float = MBU,
) -> float:
    """Seconds for one engine step on a TP group (see `step_cost`)."""
    cost = step_cost(gpu, model, num_gpus_tp, batch_tokens, decode_seqs, mean_context, mfu, mbu)
    return cost.total_s


def allreduce_s(gpu: GPU, model: Model, tp: int, batch_tokens: int) -> float:
    """Megatron-style TP: two all-reduces of the activations per layer (after attention and
    after the MLP); a ring all-reduce sends 2 * (tp - 1) / tp of the buffer per GPU. Not
    overlapped with compute (vLLM does not), bandwidth only (NCCL latency is left out)."""
    if tp == 1:
        return 0.0
    buffer = batch_tokens * model.hidden * model.dtype_bytes
    sent = 2 * model.layers * buffer * 2 * (tp - 1) / tp
    return sent / (gpu.nvlink_gbs * 1e9)


def _check_step(
    tp: int, batch_tokens: int, decode_seqs: int, mean_context: float, mfu: float, mbu: float
) -> None:
    if tp < 1:
        raise ValueError(f"num_gpus_tp must be >= 1, got {tp}")
    if batch_tokens < 1 or not 0 <= decode_seqs <= batch_tokens:
        raise ValueError(
            f"need 1 <= batch_tokens and 0 <= decode_seqs <= batch_tokens, "
            f"got {batch_tokens} and {decode_seqs}"
        )
    if mean_context < 0:
        raise ValueError(f"mean_context must be >= 0, got {mean_context}")
    if not (0 < mfu <= 1 and 0 < mbu <= 1):
        raise ValueError(f"mfu and mbu must be in (0, 1], got {mfu} and {mbu}")


def kv_transfer_s(model: Model, tokens: int, link_gbs: float) -> float:
    """Seconds to move `tokens` tokens of KV over a link of `link_gbs` GB/s (bandwidth only).
    A TP group sends its shards in parallel, one NIC per GPU: pass TP * network_gbs."""
    if tokens < 0 or link_gbs <= 0:
        raise ValueError(f"need tokens >= 0 and link_gbs > 0, got {tokens} and {link_gbs}")
    return tokens * model.kv_bytes_per_token / (link_gbs * 1e9)


def kv_capacity_tokens(gpu: GPU, model: Model, num_gpus_tp: int, mem_fraction: float) -> int:
    """Tokens of KV a TP group holds in `mem_fraction` of its HBM after the weights (0 when the
    weights do not fit); vLLM's gpu_memory_utilization is the same knob (default 0.9)."""
    free = num_gpus_tp * gpu.hbm_gb * 1e9 * mem_fraction - model.weight_bytes
    return max(0, int(free // model.kv_bytes_per_token))
