"""One model, one KV cache, one scheduler: the step loop both worker kinds run.

add_request ──> Scheduler (WAITING) ──schedule──> ModelRunner.execute
     ^                                                  │ logits
     │                        Sampler ──> token ──> stop checks ──> RequestOutput
     └── abort: blocks freed at once                         └─ finished: blocks freed
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.engine_config import EngineConfig
from engine.errors import InvalidRequestError, check_prompt
from engine.heap import retain_freed_memory
from engine.loader import load_config, load_state_dict, load_tokenizer, resolve_model
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput, RequestTimings
from engine.sampler import SampledToken, Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulingPolicy
from engine.sequence import FinishReason, Sequence
from engine.step_log import StepLog
from engine.tokenizer import IncrementalDetokenizer
from engine.tpot_governor import TpotGovernor

DEFAULT_MAX_MODEL_LEN = 8192
LayerHook = Callable[[int, list[ScheduledChunk]], None]


@dataclass(slots=True)
class EngineStats:
    """Counters over the engine's life; the benchmarks read them."""

    steps: int = 0
    batched_tokens: int = 0
    preemptions: int = 0
    kv_slots_allocated: int = 0  # summed over steps
    kv_slots_filled: int = 0
    # the last step's phase boundaries (perf_counter): schedule, prepare, forward, logits,
    # sample, append (bench step reads them)
    step_marks: tuple[float, ...] = ()
    busy_s: float = 0.0  # time inside steps that ran a batch (steps / busy: the step rate)

    @property
    def kv_waste(self) -> float:
        """Share of allocated KV slots that held no token, averaged over steps."""
        if not self.kv_slots_allocated:
            return 0.0
        return 1.0 - self.kv_slots_filled / self.kv_slots_allocated


@dataclass(slots=True)
class _Request:
    seq: Sequence
    output: RequestOutput
    detok: IncrementalDetokenizer


def kv_capacity(config: EngineConfig, model_config: ModelConfig) -> tuple[int, int]:
    """(max_model_len, KV blocks) of an engine; InvalidRequestError if one sequence of
    max_model_len does not fit (checked before any worker starts, and by every engine)."""
    c = model_config
    max_model_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN, c.max_position_embeddings)
    per_block = 2 * c.num_layers * config.block_size * c.num_kv_heads * c.head_dim
    per_block *= config.torch_dtype.itemsize
    num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_gb * 2**30 // per_block))
    if num_blocks * config.block_size < max_model_len:
        raise InvalidRequestError(
            f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one "
            f"sequence of max_model_len {max_model_len}: give a larger --kv-cache-gb"
        )
    return max_model_len, num_blocks


def check_kv_capacity(config: EngineConfig) -> None:
    kv_capacity(config, load_config(resolve_model(config.model)))


class LLMEngine:
    def __init__(self, config: EngineConfig):
        retain_freed_memory()  # a step's activations reuse heap memory (engine.heap)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        path = resolve_model(config.model)
        self.model_config = load_config(path)
        self.tokenizer = load_tokenizer(path)
        self.max_model_len, num_blocks = kv_capacity(config, self.model_config)
        state = load_state_dict(path, self.model_config, config.torch_dtype)
        self.runner = ModelRunner(
            self.model_config,
            state,
            num_blocks,
            config.block_size,
            config.torch_dtype,
            config.torch_device,
            config.packed_gemm,
            config.decode_graphs,
            config.max_num_seqs,
            -(-self.max_model_len // config.block_size),
        )
        del state
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                policy=SchedulingPolicy(config.scheduling),
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                chunked_prefill=config.chunked_prefill,
            )
        )
        self.sampler = Sampler(config.seed)
        self.governor = (
            None
            if config.max_tpot_ms is None
            else TpotGovernor(config.max_tpot_ms, config.max_num_seqs)
        )
        self._requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.step_log = StepLog.from_env()

    # ---- requests ------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: Seq[int]) -> None:
        check_prompt(prompt_token_ids, self.max_model_len, self.model_config.vocab_size)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_s: float | None = None,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request. `prefill_only`: stop after the first token and hold the prompt's
        KV until `release` (a prefill worker hands it to a decode worker meanwhile)."""
        req = self._new_request(request_id, prompt_token_ids, params, prompt, arrival_s)
        req.seq.prefill_only = prefill_only
        self.scheduler.add(req.seq)

    def _new_request(self, request_id, prompt_token_ids, params, prompt, arrival_s) -> _Request:
        if request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        self.validate_prompt(prompt_token_ids)
        ids = list(prompt_token_ids)
        timings = RequestTimings(time.perf_counter() if arrival_s is None else arrival_s)
        output = RequestOutput(request_id, list(ids), prompt=prompt, timings=timings)
        if params.logprobs is not None:
            output.logprobs = []
        req = _Request(
            Sequence(request_id, ids, params), output, IncrementalDetokenizer(self.tokenizer, ids)
        )
        self._requests[request_id] = req
        return req

    def release(self, request_id: str) -> None:
        """Free the KV a prefill-only request held for hand-off."""
        seq = self.scheduler.held.get(request_id)
        if seq is not None:
            self.scheduler.release(seq)

    # ---- KV computed elsewhere (decode worker) --------------------------------
    def reserve_remote(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams
    ) -> list[int] | None:
        """Reserve blocks for a prompt whose KV a prefill worker will send; None: no room."""
        req = self._new_request(request_id, prompt_token_ids, params, None, None)
        blocks = self.scheduler.reserve_remote(req.seq, len(req.seq.token_ids))
        if blocks is None:
            del self._requests[request_id]
        return blocks

    def remote_kv_landed(self, request_id: str, first: SampledToken) -> RequestOutput | None:
        """All pages are in: append the prefill's first token and join the running batch."""
        req = self._requests.get(request_id)
        if req is None:  # aborted meanwhile
            return None
        num_prompt = req.seq.num_tokens
        now = time.perf_counter()
        req.output.timings.landed_s = now
        out = self._append(req, first, now)
        if not out.finished:
            self.scheduler.kv_landed(request_id, num_prompt)
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self._requests.pop(request_id, None)
        self.scheduler.abort(request_id)  # also frees KV a finished prefill still holds
        if req is None:
            return None
        self.sampler.forget(request_id)
        req.output.finish_reason = FinishReason.ABORT.value
        req.output.timings.finished_s = time.perf_counter()
        return req.output

    def snapshot(self) -> dict[str, int]:
        """Queue depths and KV use, for /status (call between steps)."""
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "awaiting_kv": len(s.awaiting_kv),
            "landed": len(s.landed),
            "lanes": s.lanes,
            "held": len(s.held),
            "kv_blocks_used": s.allocator.num_used,
            "kv_blocks_total": s.allocator.num_blocks,
            "preemptions": self.stats.preemptions,
            "steps": self.stats.steps,
            "step_busy_ms": int(self.stats.busy_s * 1000),
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "prefix_query_tokens": s.prefix_query_tokens,
        }

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- the step ------------------------------------------------------------
    def step(self, layer_hook: LayerHook | None = None) -> list[RequestOutput]:
        """Run one iteration; return the outputs that got a token or finished.

        `layer_hook(layer, chunks)` runs after each layer's KV is in the cache (KV streaming).
        """
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        t1 = time.perf_counter()
        self._mark_scheduled(out, t0)
        batch = self.runner.prepare(out)
        hook = None if layer_hook is None else (lambda layer: layer_hook(layer, batch.chunks))
        t2 = time.perf_counter()
        hidden = self.runner.forward(batch, hook)
        t3 = time.perf_counter()
        logits = self.runner.logits(batch, hidden)
        t4 = time.perf_counter()
        self.scheduler.step_done(out)
        self._govern(out, t4 - t1)
        self._count(out)
        seqs = [c.seq for c in batch.sample_chunks]
        sampled = self.sampler.sample(logits, [s.seq_id for s in seqs], [s.params for s in seqs])
        t5 = time.perf_counter()
        reqs = [self._requests[s.seq_id] for s in seqs]
        outputs = [self._append(req, tok, t5) for req, tok in zip(reqs, sampled, strict=True)]
        self.stats.step_marks = marks = (t0, t1, t2, t3, t4, t5, time.perf_counter())
        self.stats.busy_s += marks[-1] - t0
        if self.step_log is not None:
            self.step_log.record(out.features(), t0, marks[-1] - t0)
        return outputs

    def _mark_scheduled(self, out, now: float) -> None:
        for chunk in out.chunks:
            req = self._requests.get(chunk.seq.seq_id)
            if req is not None and req.output.timings.scheduled_s is None:
                req.output.timings.scheduled_s = now

    def _govern(self, out, step_s: float) -> None:
        """Decode-only steps tell the TPOT governor how long a token takes at this batch."""
        if self.governor is None or any(c.num_tokens != 1 for c in out.chunks):
            return
        self.scheduler.lanes = self.governor.observe(len(out.chunks), step_s * 1000)

    def _count(self, out) -> None:
        st = self.stats
        st.steps += 1
        st.batched_tokens += out.num_batched_tokens
        st.preemptions += len(out.preempted)
        allocated, filled = self.scheduler.kv_slot_usage()
        st.kv_slots_allocated += allocated
        st.kv_slots_filled += filled

    def _append(self, req: _Request, tok: SampledToken, now: float) -> RequestOutput:
        seq, out = req.seq, req.output
        seq.token_ids.append(tok.token_id)
        out.token_ids.append(tok.token_id)
        if out.logprobs is not None:
            out.logprobs.append(tok)
        if out.timings.first_token_s is None:
            out.timings.first_token_s = now
        out.timings.token_times_s.append(now)
        out.text += req.detok.push(tok.token_id)
        reason = self._stop_reason(req, tok.token_id)
        if reason is None and seq.prefill_only:
            reason = FinishReason.PREFILLED
        if reason is not None:
            self._finish(req, reason, now)
        return out

    def _stop_reason(self, req: _Request, token_id: int) -> FinishReason | None:
        seq, params = req.seq, req.seq.params
        if not params.ignore_eos and token_id in self.tokenizer.stop_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if params.stop and self._truncate_at_stop_string(req.output, params):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _truncate_at_stop_string(out: RequestOutput, params: SamplingParams) -> bool:
        hits = [(out.text.find(s), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        out.text = out.text[: i + len(s)] if params.include_stop_str_in_output else out.text[:i]
        return True

    def _finish(self, req: _Request, reason: FinishReason, now: float) -> None:
        out = req.output
        if reason is FinishReason.LENGTH:  # a stop ends on whole text already
            out.text += req.detok.flush()
        out.finish_reason = reason.value
        out.timings.finished_s = now
        self.scheduler.finish(req.seq, reason)
        self.sampler.forget(req.seq.seq_id)
        del self._requests[req.seq.seq_id]
