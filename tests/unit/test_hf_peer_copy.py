"""`bench peer`'s HF copy: transformers loads it, and it computes and tokenizes what splitserve
does (tiny checkpoint and tiny GGUF); the CLI's option checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_checkpoint, write_tiny_gguf

from bench import hf_peer, peer_compare
from bench.hf_baseline import load_hf_model
from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError
from engine.loader import load_tokenizer, resolve_model

transformers = pytest.importorskip("transformers")

TEXTS = ["Continuous batching admits requests.", "Ünïcödé café 東京 😀", "def f(x):\n  return x"]
MESSAGES = [{"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peer")
    hf_dir = make_tiny_checkpoint(root / "tiny", seed=5)
    return {"hf": hf_dir, "gguf": write_tiny_gguf(root / "tiny.gguf", hf_dir)}


@pytest.fixture(scope="module", params=["hf", "gguf"])
def copy(request, sources, tmp_path_factory) -> tuple[Path, Path]:
    """(source, its float32 HF copy)."""
    source = sources[request.param]
    out = tmp_path_factory.mktemp(f"copy-{request.param}") / "hf"
    return source, hf_peer.write_hf_copy(str(source), out, "float32")


def test_copy_computes_what_splitserve_serves(copy):
    source, out = copy
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = load_hf_model(str(source), "float32")
    ids = torch.tensor([[5, 17, 42, 99, 230, 7, 311]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, reference(ids).logits)
        ours.generation_config.eos_token_id = None  # like ignore_eos
        gen = ours.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    llm = LLM(model=str(source), dtype="float32", num_kv_blocks=256, block_size=4, num_threads=1)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert gen[0, ids.shape[1] :].tolist() == llm.generate([ids[0].tolist()], greedy)[0].token_ids


def test_copy_tokenizes_and_stops_like_splitserve(copy):
    source, out = copy
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(resolve_model(str(source)))
    for text in TEXTS:
        assert tok(text).input_ids == ours.encode(text)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(MESSAGES)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == sorted(ours.stop_token_ids)


def test_second_write_is_skipped_and_a_new_dtype_rewrites(sources, tmp_path):
    out = hf_peer.write_hf_copy(str(sources["gguf"]), tmp_path / "hf", "float32")
    weights = out / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert hf_peer.write_hf_copy(str(sources["gguf"]), out, "float32") == out
    assert weights.stat().st_mtime_ns == written
    hf_peer.write_hf_copy(str(sources["gguf"]), out, "bfloat16")
    assert {t.dtype for t in load_file(weights).values()} == {torch.bfloat16}


def test_refuses_a_directory_it_did_not_write(sources, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="did not write"):
        hf_peer.write_hf_copy(str(sources["hf"]), theirs, "float32")
    assert [p.name for p in theirs.iterdir()] == ["config.json"]
    with pytest.raises(InvalidRequestError, match="overwrite its source"):
        hf_peer.write_hf_copy(str(sources["hf"]), sources["hf"], "float32")
    with pytest.raises(InvalidRequestError, match="dtype"):
        hf_peer.write_hf_copy(str(sources["hf"]), tmp_path / "new", "float16")


def test_kv_cache_blocks_fill_the_budget(copy):
    _, out = copy  # 2 layers, 2 KV heads of 16 dims: 512 bytes per float32 token
    blocks = hf_peer.kv_cache_blocks(out, "float32", 1.0)
    assert blocks == 2**30 // (512 * hf_peer.CB_PAGE_SIZE)
    assert hf_peer.kv_cache_blocks(out, "bfloat16", 1.0) == 2 * blocks
    assert hf_peer.kv_cache_blocks(out, "float32", 1e-9) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-prompts", "0"], "--num-prompts must be positive"),
        (["--request-rate", "nan"], "--request-rate must be positive"),
        (["--max-concurrency", "0"], "--max-concurrency must be positive"),
        (["--peer-kv-cache-gb", "0"], "--peer-kv-cache-gb must be positive"),
        (["--splitserve-args", "--port 9000"], "cannot set --port"),
        (["--splitserve-args", "--model=x"], "cannot set --model"),
        (["--splitserve-args", "--mode 'colocated"], "--splitserve-args: No closing quotation"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, tmp_path):
    args = peer_compare.parse_peer_args(["=".join(argv), "--hf-dir", str(tmp_path / "hf")])
    with pytest.raises(InvalidRequestError, match=message):
        peer_compare.run_peer_compare(args)
    assert not (tmp_path / "hf").exists()  # rejected before any work


def test_splitserve_args_are_passed_through():
    args = peer_compare.parse_peer_args(["--splitserve-args=--no-layerwise --max-num-seqs 8"])
    assert peer_compare._validate(args) == [["--no-layerwise", "--max-num-seqs", "8"]]
    assert hf_peer.default_hf_dir("smollm2-135m", "bfloat16").name == "hf-smollm2-135m-bfloat16"
    assert hf_peer.default_hf_dir("/m/tiny.gguf", "float32").name == "hf-tiny-float32"
