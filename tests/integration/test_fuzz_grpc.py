"""Property-based fuzzing of the gRPC API on a real port (hypothesis, derandomized), and the
server's own request ids.

>= 1,000 generated GenerateRequest messages (any prompt kind or none, token ids anywhere in
uint32, unicode stop strings, NaN / infinite / huge floats, ints across their wire types,
long request ids, unknown models and roles) over one channel: every call ends OK or
INVALID_ARGUMENT / NOT_FOUND, never INTERNAL / UNKNOWN / UNAVAILABLE; an OK stream ends
with finish_reason and usage and echoes the client's request_id.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint

from router.limits import CHAT_ROLES
from splitserve_proto import generation_pb2 as pb
from splitserve_proto import generation_pb2_grpc as pb_grpc

MODEL = "tiny-llama"
MAX_MODEL_LEN, VOCAB = 512, 300
BATCH, EXAMPLES, WANT_MESSAGES = 5, 300, 1_000
TIMEOUT_S = 60
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

UINT32 = st.integers(0, 2**32 - 1)
TEXT = st.text(max_size=40)
# field: (values that are fine, values across the wire type that are mostly not)
SAMPLING = {
    "max_tokens": (st.integers(1, 2), st.just(0) | st.integers(MAX_MODEL_LEN + 1, 2**32 - 1)),
    "temperature": (st.floats(0, 2, width=32), st.floats(width=32)),  # NaN, +-inf, huge
    "top_p": (st.floats(0.5, 1, width=32), st.floats(width=32)),
    "top_k": (st.sampled_from([-1, 1, 5]), st.integers(-(2**31), 2**31 - 1)),
    "seed": (st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    "stop": (
        st.lists(st.text(min_size=1, max_size=12), max_size=4),
        st.lists(st.text(max_size=12) | st.text(min_size=250, max_size=300), max_size=6),
    ),
    "ignore_eos": (st.booleans(), st.booleans()),
    "logprobs": (st.integers(0, 5), UINT32),
}
NAMES = sorted(SAMPLING)
GOOD_NAMES = st.lists(st.sampled_from(NAMES), max_size=4, unique=True)
JUNK_NAMES = st.lists(st.sampled_from(NAMES), max_size=1)
MESSAGES = st.lists(st.tuples(st.sampled_from(CHAT_ROLES), TEXT), min_size=1, max_size=3)
BAD_MESSAGES = st.lists(st.tuples(st.sampled_from(CHAT_ROLES) | st.text(max_size=10), TEXT))
TOKEN_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30)
BAD_TOKEN_IDS = st.lists(st.integers(0, VOCAB - 1) | UINT32, max_size=30)
PROMPT_KINDS = st.sampled_from(["text"] * 3 + ["token_ids"] * 3 + ["chat"] * 3 + [None])
ONE_IN_5 = st.integers(0, 4).map(lambda i: i == 0)
MODELS = (st.sampled_from(["", MODEL]), TEXT)
REQUEST_IDS = (st.sampled_from(["", "same-id"]) | TEXT, st.text(min_size=257, max_size=300))


def _prompt(draw: st.DrawFn, req: pb.GenerateRequest) -> None:
    kind, bad = draw(PROMPT_KINDS), draw(ONE_IN_5)
    if kind == "text":
        req.text = draw(st.integers(0, 700).map(lambda n: "hi " * n) if bad else TEXT)
    elif kind == "token_ids":
        req.token_ids.SetInParent()
        req.token_ids.ids.extend(draw(BAD_TOKEN_IDS if bad else TOKEN_IDS))
    elif kind == "chat":
        req.chat.SetInParent()
        for role, content in draw(BAD_MESSAGES if bad else MESSAGES):
            req.chat.messages.add(role=role, content=content)


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Valid but for a field or so: the model, the prompt, a sampling field, the id."""
    req = pb.GenerateRequest(
        model=draw(MODELS[draw(ONE_IN_5)]), request_id=draw(REQUEST_IDS[draw(ONE_IN_5)])
    )
    _prompt(draw, req)
    sampling = {"max_tokens": draw(SAMPLING["max_tokens"][0])}
    if draw(ONE_IN_5):
        del sampling["max_tokens"]  # unset: the default 16
    for name in draw(GOOD_NAMES):
        sampling[name] = draw(SAMPLING[name][0])
    for name in draw(JUNK_NAMES):
        sampling[name] = draw(SAMPLING[name][1])
    req.sampling.CopyFrom(pb.SamplingOptions(**sampling))
    return req


def _problem(stub: pb_grpc.GenerationStub, req: pb.GenerateRequest, codes: Counter) -> str | None:
    try:
        replies = list(stub.Generate(req, timeout=TIMEOUT_S))
    except grpc.RpcError as exc:
        codes[exc.code()] += 1
        if exc.code() not in ALLOWED:
            return f"{exc.code().name}: {exc.details()}"
        if not exc.details() or "\n" in exc.details():
            return f"details not one line: {exc.details()!r}"
        return None
    codes[grpc.StatusCode.OK] += 1
    last = replies[-1]
    if last.finish_reason not in ("stop", "length") or not last.HasField("usage"):
        return f"stream ended without a finish: {last}"
    want_id = req.request_id or last.request_id
    if not last.request_id or any(r.request_id != want_id for r in replies):
        return f"request_id {last.request_id!r} is not the client's {req.request_id!r}"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerThread.for_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), MODEL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        yield pb_grpc.GenerationStub(channel)


def test_fuzzed_messages_end_ok_or_invalid_argument(stub: pb_grpc.GenerationStub) -> None:
    codes: Counter = Counter()
    start = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(requests(), min_size=BATCH, max_size=BATCH))
    def run(batch: list[pb.GenerateRequest]) -> None:
        problems = [(r, p) for r in batch if (p := _problem(stub, r, codes)) is not None]
        assert not problems, problems[:3]

    run()
    sent = sum(codes.values())
    print(f"\n{sent} messages in {time.monotonic() - start:.1f} s; {dict(codes)}")
    assert sent >= WANT_MESSAGES
    assert codes[grpc.StatusCode.OK] > 0.2 * sent and codes[grpc.StatusCode.NOT_FOUND] > 0


def _greedy(prompt: str, request_id: str) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(text=prompt, request_id=request_id, sampling=sampling)


def _text(replies: Iterable[pb.GenerateResponse]) -> str:
    return "".join(r.text for r in replies)


def test_same_client_request_id_on_two_streams_does_not_collide(
    stub: pb_grpc.GenerationStub,
) -> None:
    """Two clients that pick the same request_id each get their own generation, and one
    cancelling does not reach the other: the id inside the server is the server's."""
    a, b = "The quick brown fox", "A paged KV cache stores"
    alone = {p: _text(stub.Generate(_greedy(p, ""), timeout=TIMEOUT_S)) for p in (a, b)}
    assert alone[a] != alone[b]
    call_a = stub.Generate(_greedy(a, "mine"), timeout=TIMEOUT_S)
    call_b = stub.Generate(_greedy(b, "mine"), timeout=TIMEOUT_S)
    first_a, first_b = next(call_a), next(call_b)  # both in flight at once
    got_a, got_b = [first_a, *call_a], [first_b, *call_b]
    assert (_text(got_a), _text(got_b)) == (alone[a], alone[b])
    assert {r.request_id for r in got_a + got_b} == {"mine"}

    cut = stub.Generate(_greedy(a, "mine"), timeout=TIMEOUT_S)
    whole = stub.Generate(_greedy(b, "mine"), timeout=TIMEOUT_S)
    next(cut)
    rest = [next(whole)]
    cut.cancel()  # aborts its own request only
    rest += list(whole)
    assert _text(rest) == alone[b] and rest[-1].finish_reason == "length"


def test_bytes_that_are_not_a_message_get_invalid_argument(server: ServerThread) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_stream("/splitserve.v1.Generation/Generate")
        for raw in (b"\xff\xff\xff", b"\x12\x02\xff\xfe"):  # corrupt wire; bad UTF-8 in text
            with pytest.raises(grpc.RpcError) as info:
                list(call(raw, timeout=TIMEOUT_S))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
