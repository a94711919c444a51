"""Tiny seeded checkpoints for tests: an HF-format dir (safetensors + byte-level BPE tokenizer) and,
from it, a GGUF file written the way llama.cpp's converter writes one."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving large language models means scheduling prefill and decode steps.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Continuous batching admits new requests at every decode iteration.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def forward(self, x):\n    return self.proj(x) + x\n",
    "Numbers like 12345 and 3.14159 appear in text, as do dates: 2024-05-01.",
    "Ünïcödé text: café, naïve, 東京, 日本語, Привет мир, 😀 🚀 emoji.",
    "the the the and and and of of of to to to in in in is is is",
    "Prefill is compute-bound; decode is bandwidth-bound.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """A small byte-level BPE (special tokens 0..2, 256 byte tokens, merges up to ~400)."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return tokenizer.to_str()


def _weights(
    config: dict, seed: int, architecture: str, tie: bool, bias: bool
) -> dict[str, torch.Tensor]:
    """Seeded random weights under HF Llama names; std large enough for varied greedy output."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]

    def randn(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    weights = {"model.embed_tokens.weight": randn(config["vocab_size"], hidden, std=0.5)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = randn(hidden, std=0.1, mean=1.0)
        for proj, rows in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            weights[p + f"self_attn.{proj}_proj.weight"] = randn(rows, hidden)
            if bias:
                weights[p + f"self_attn.{proj}_proj.bias"] = randn(rows, std=0.1)
        weights[p + "self_attn.o_proj.weight"] = randn(hidden, q_dim)
        weights[p + "post_attention_layernorm.weight"] = randn(hidden, std=0.1, mean=1.0)
        weights[p + "mlp.gate_proj.weight"] = randn(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = randn(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = randn(hidden, inter)
    weights["model.norm.weight"] = randn(hidden, std=0.1, mean=1.0)
    if not tie:
        weights["lm_head.weight"] = randn(config["vocab_size"], hidden, std=0.5)
    return weights


def _save_weights(path: Path, weights: dict[str, torch.Tensor], sharded: bool) -> None:
    if not sharded:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: weights[n] for n in shard}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(
    path: Path,
    seed: int = 0,
    *,
    architecture: str = "llama",
    tie_word_embeddings: bool = True,
    attention_bias: bool = False,
    sharded: bool = False,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a tiny HF checkpoint dir (config, safetensors, tokenizer) at `path`; returns `path`."""
    if attention_bias and architecture != "qwen2":
        raise ValueError(
            "q/k/v bias without o_proj bias is Qwen2's layout: use architecture='qwen2'"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _tokenizer_json()
    (path / "tokenizer.json").write_text(tokenizer_json)
    vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    bias = architecture == "qwen2"  # Qwen2 always has q/k/v bias
    config = {
        "architectures": ["Qwen2ForCausalLM" if architecture == "qwen2" else "LlamaForCausalLM"],
        "model_type": architecture,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if architecture == "qwen2":
        config["use_sliding_window"] = False
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": max_position_embeddings,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    weights = _weights(config, seed, architecture, tie_word_embeddings, bias)
    _save_weights(path, weights, sharded)
    return path


_GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for an HF Llama tensor name."""
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        layer, rest = module.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{_GGUF_NAMES[rest]}.{kind}"
    return f"{_GGUF_NAMES[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of Q/K rows (HF rotate-half -> interleaved pairs)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_blocks(rows: int, cols: int, qtype: QType, seed: int = 0) -> np.ndarray:
    """Valid raw blocks of a type gguf cannot quantize: random bytes, finite fp16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scale_offsets = {QType.Q4_K: (0, 2), QType.Q6_K: (208,)}.get(qtype, ())
    for offset in scale_offsets:
        scales = rng.uniform(0.001, 0.02, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def _encode_tensor(values: np.ndarray, qtype: QType, seed: int) -> tuple[np.ndarray, QType]:
    """Values -> (data, type) as llama.cpp stores them; 1-D tensors and odd widths stay F32."""
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if values.ndim == 1 or values.shape[-1] % block_size:
        return values, QType.F32
    if qtype in (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1):
        return gguf.quants.quantize(values, qtype), qtype
    return random_blocks(*values.shape, qtype, seed), qtype


def write_tiny_gguf(
    path: Path,
    checkpoint_dir: Path,
    qtype: QType = QType.F32,
    *,
    pre: str = "gpt2",
    arch: str | None = None,
) -> Path:
    """A GGUF of a tiny (unsharded) checkpoint, its matrices stored as `qtype` (types gguf cannot
    quantize get random valid blocks instead of the checkpoint's values). `arch` overrides the
    GGUF architecture ("llama" permutes Q/K rows and biases as llama.cpp does; "qwen2" not)."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    arch = arch or ("qwen2" if config["model_type"] == "qwen2" else "llama")
    writer = gguf.GGUFWriter(str(path), arch)
    write_gguf_model_metadata(writer, config)
    _write_tokenizer_metadata(writer, checkpoint_dir, pre)
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="np") as f:
        for seed, name in enumerate(sorted(f.keys())):
            values = f.get_tensor(name).astype(np.float32)
            if arch == "llama" and ".q_proj." in name:
                values = llama_cpp_permute(values, config["num_attention_heads"])
            elif arch == "llama" and ".k_proj." in name:
                values = llama_cpp_permute(values, config["num_key_value_heads"])
            data, stored_type = _encode_tensor(values, qtype, seed)
            writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=stored_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf_model_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    """The `llama.*`-style hyperparameter keys of an HF `config.json` dict."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["head_dim"])


def _write_tokenizer_metadata(writer: gguf.GGUFWriter, checkpoint_dir: Path, pre: str) -> None:
    model = json.loads((checkpoint_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
