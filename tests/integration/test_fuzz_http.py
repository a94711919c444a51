"""Property-based fuzzing of the OpenAI HTTP API on a real socket (hypothesis, derandomized).

>= 10,000 generated bodies over /v1/completions and /v1/chat/completions: requests that are
valid but for a field or two, random JSON, NaN / infinities / numbers past float and int
range, deep nesting, invalid UTF-8, mutated and truncated bytes, oversize bodies (with and
without Content-Length), random `stream`. Each example sends a batch over CONNECTIONS
kept-alive connections at once. For every body: status < 500; the connection is never
dropped nor closed (each client sends all its bodies over one connection); every 4xx is an
OpenAI error body; every 200 is a whole response, and a streamed one ends `data: [DONE]`.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint

from router.limits import CHAT_ROLES, RequestLimits

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512  # the tiny checkpoint's context
VOCAB = 300  # token ids below this are in the tiny vocabulary
LIMIT = RequestLimits().max_body_bytes
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PATHS = (COMPLETIONS, CHAT)
CONNECTIONS, BATCH, EXAMPLES = 16, 24, 145  # ~3.2 bodies a case: ~11,000 bodies
WANT_BODIES = 10_000


class Raw(str):
    """Written into the body verbatim: what JSON cannot say, or Python's json would not."""


def dump(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)  # NaN / Infinity come out as such: not JSON


# ---- values ---------------------------------------------------------------------------------

SPECIALS = st.sampled_from(
    [Raw(s) for s in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-400", "-0")]
    + [Raw("9" * 400), Raw("-" + "9" * 4300), Raw("9" * 5000), Raw('"\\ud800"'), Raw("0x10")]
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), SPECIALS
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


def _not_long(v: Any) -> bool:  # a junk max_tokens must not ask for a long generation
    return v is not None and not (type(v) is int and 3 <= v <= MAX_MODEL_LEN)


JUNK_MAX_TOKENS = (JSON | st.integers(-(2**70), 0) | st.integers(MAX_MODEL_LEN + 1)).filter(
    _not_long
)
SHORT_TEXT = st.text(max_size=30)
TOKEN_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30)
PROMPTS = st.one_of(
    SHORT_TEXT,
    TOKEN_IDS,
    st.lists(SHORT_TEXT, min_size=1, max_size=1),
    st.lists(TOKEN_IDS, min_size=1, max_size=1),
    st.integers(0, 700).map(lambda n: "hi " * n),  # around the context's end
)
BAD_PROMPTS = st.one_of(
    JSON,
    st.lists(st.integers(), max_size=5),
    st.lists(st.one_of(SHORT_TEXT, st.integers(), TOKEN_IDS), max_size=3),
)
STOPS = st.one_of(
    st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=4)
)
# field: (values that are fine, values that are wrong); the wrong ones also draw from JSON
SHARED_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "model": (st.sampled_from([MODEL, None]), st.text(max_size=20)),
    "temperature": (st.floats(0, 2), st.floats().filter(lambda t: not 0 <= t <= 2) | SPECIALS),
    "top_p": (st.floats(0.01, 1), st.floats().filter(lambda p: not 0 < p <= 1) | SPECIALS),
    "top_k": (st.sampled_from([-1, 1, 5]) | st.integers(1, 2**31 - 1), st.integers(max_value=0)),
    "seed": (
        st.integers(-(2**63), 2**64 - 1),
        st.integers(2**64) | st.integers(max_value=-(2**63) - 1),
    ),
    "stop": (
        STOPS,
        st.text(min_size=257, max_size=300) | st.lists(st.text(max_size=3), min_size=5),
    ),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=3), st.lists(st.integers())),
    "ignore_eos": (st.booleans(), st.integers()),
    "include_stop_str_in_output": (st.booleans(), st.text(max_size=3)),
    "stream": (st.booleans(), st.integers()),
    "stream_options": (st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": (st.sampled_from([1, None]), st.integers().filter(lambda n: n != 1)),
    "user": (st.text(max_size=20), st.text(min_size=257, max_size=300)),
    "frequency_penalty": (st.sampled_from([0, 0.0]), st.sampled_from([0.5, False, -2])),
    "presence_penalty": (st.sampled_from([0, None]), st.sampled_from([1, "0"])),
    "logit_bias": (st.sampled_from([{}, None]), st.just({"1": 5})),
}
COMPLETION_FIELDS = {
    **SHARED_FIELDS,
    "logprobs": (st.integers(0, 5) | st.none(), st.integers().filter(lambda n: not 0 <= n <= 20)),
    "echo": (st.sampled_from([False, None]), st.just(True)),
    "best_of": (st.just(1), st.integers().filter(lambda n: n != 1)),
    "suffix": (st.sampled_from(["", None]), st.text(min_size=1)),
}
PARTS = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": SHORT_TEXT}), min_size=1, max_size=2
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(CHAT_ROLES), "content": SHORT_TEXT | PARTS},
    optional={"name": SHORT_TEXT, "refusal": st.none()},
)
BAD_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.text(max_size=10) | JSON,
        "content": JSON | st.lists(st.fixed_dictionaries({"type": SHORT_TEXT})),
    },
)
CHAT_FIELDS = {
    **SHARED_FIELDS,
    "max_completion_tokens": (st.integers(1, 2), JUNK_MAX_TOKENS),
    "logprobs": (st.booleans(), st.integers()),
    "top_logprobs": (st.integers(0, 5), st.integers().filter(lambda n: not 0 <= n <= 20)),
    "tools": (st.sampled_from([[], None]), st.just([{"type": "function"}])),
    "tool_choice": (st.sampled_from(["none", "auto"]), st.just("required")),
    "response_format": (st.just({"type": "text"}), st.just({"type": "json_object"})),
    "metadata": (JSON, st.nothing()),
    "store": (st.booleans(), st.nothing()),
}


@dataclass(frozen=True)
class Endpoint:
    """One endpoint's strategies, built once (a strategy built inside a draw is slow)."""

    key: str  # the prompt's field
    prompt: st.SearchStrategy[Any]
    bad_prompt: st.SearchStrategy[Any]
    own_names: st.SearchStrategy[list[str]]  # fields besides the shared ones
    junk_names: st.SearchStrategy[list[str]]
    good: dict[str, st.SearchStrategy[Any]]
    junk: dict[str, st.SearchStrategy[Any]]

    @classmethod
    def of(cls, key: str, prompt: Any, bad_prompt: Any, fields: dict) -> Endpoint:
        own = sorted(set(fields) - set(SHARED_FIELDS))
        junk = {n: JUNK_MAX_TOKENS if "max_" in n else bad | JSON for n, (_, bad) in fields.items()}
        return cls(
            key,
            prompt,
            st.none() | bad_prompt,
            st.lists(st.sampled_from(own), max_size=2, unique=True),
            st.lists(st.sampled_from(["max_tokens", *sorted(fields)]), max_size=1),
            {n: good for n, (good, _) in fields.items()},
            {**junk, "max_tokens": JUNK_MAX_TOKENS},
        )


ENDPOINTS = (
    Endpoint.of("prompt", PROMPTS, BAD_PROMPTS, COMPLETION_FIELDS),
    Endpoint.of(
        "messages",
        st.lists(MESSAGE, min_size=1, max_size=3),
        st.lists(BAD_MESSAGE, max_size=3),
        CHAT_FIELDS,
    ),
)
SHARED_NAMES = st.lists(st.sampled_from(sorted(SHARED_FIELDS)), max_size=5, unique=True)
ONE_IN_20 = st.integers(0, 19).map(lambda i: i == 0)
FIELD_NAMES = st.text(min_size=1, max_size=12)


@st.composite
def structured(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A completions and a chat request, valid but for a field or two (wrong type, out of
    range, unknown); the fields the endpoints share are drawn once for both."""
    shared: dict[str, Any] = {"max_tokens": draw(st.integers(1, 2))}
    for name in draw(SHARED_NAMES):
        shared[name] = draw(SHARED_FIELDS[name][0])
    bodies = []
    for e in ENDPOINTS:
        body = {**shared, e.key: draw(e.prompt)}
        for name in draw(e.own_names):
            body[name] = draw(e.good[name])
        for name in draw(e.junk_names):
            body[name] = draw(e.junk[name])
        if draw(ONE_IN_20):  # the prompt: missing or wrong
            body[e.key] = draw(e.bad_prompt)
            if body[e.key] is None:
                del body[e.key]
        if draw(ONE_IN_20):
            body[draw(FIELD_NAMES)] = draw(JSON)  # maybe an unknown field
        bodies.append(body)
    return bodies


# ---- bodies ---------------------------------------------------------------------------------


@dataclass
class Case:
    path: str
    content: bytes
    chunked: bool = False  # sent without Content-Length
    content_type: str | None = "application/json"
    kind: str = ""


def _mutate(data: bytes, op: str, pos: int, junk: bytes) -> bytes:
    i = pos % (len(data) + 1)
    if op == "truncate":
        return data[:i]
    if op == "insert":
        return data[:i] + junk + data[i:]
    return data[:i] + b"\xff" + data[i + 1 :]  # never valid UTF-8


def _nested(depth: int, key: str) -> bytes:
    return b'{"' + key.encode() + b'":' + b"[" * depth + b"]" * depth + b',"max_tokens":1}'


def _oversize(extra: int, declared: bool) -> tuple[bytes, bool]:
    return b'{"prompt":"' + b"a" * (LIMIT + extra) + b'"}', not declared


KINDS = st.sampled_from(["structured"] * 6 + ["json", "other"])
OTHER_KINDS = st.sampled_from(["bytes", "empty", "nested", "oversize", "at_limit"])
CONTENT_TYPES = st.sampled_from(["application/json"] * 6 + ["text/plain", None])
MUTATION = st.tuples(
    st.sampled_from(["truncate", "insert", "invalid_utf8"]),
    st.integers(0, 10**6),
    st.binary(min_size=1, max_size=4),
)
FIELD_JSON = JSON | st.dictionaries(st.sampled_from(sorted(CHAT_FIELDS)), JSON)
NESTED = st.tuples(st.integers(1, 200_000), st.sampled_from(["prompt", "metadata", "unknown"]))
OVERSIZE = st.tuples(st.integers(1, 1 << 16), st.booleans())


@st.composite
def cases(draw: st.DrawFn) -> list[Case]:
    """A structured pair for both endpoints plus the two mutated; or one other body."""
    kind, ctype = draw(KINDS), draw(CONTENT_TYPES)
    if kind == "structured":
        pair = [dump(b).encode() for b in draw(structured())]
        op, pos, junk = draw(MUTATION)
        mutated = [_mutate(data, op, pos, junk) for data in pair]
        return [
            *(Case(p, data, False, ctype, kind) for p, data in zip(PATHS, pair, strict=True)),
            *(Case(p, data, False, ctype, op) for p, data in zip(PATHS, mutated, strict=True)),
        ]
    path = draw(st.sampled_from(PATHS))
    if kind == "json":
        return [Case(path, dump(draw(FIELD_JSON)).encode(), False, ctype, kind)]
    other, chunked = draw(OTHER_KINDS), draw(st.booleans())
    if other == "bytes":
        content = draw(st.binary(max_size=64))
    elif other == "empty":
        content = b""
    elif other == "nested":
        content = _nested(*draw(NESTED))
    elif other == "oversize":
        content, chunked = _oversize(*draw(OVERSIZE))
    else:  # exactly the limit: whitespace JSON allows
        small = b'{"prompt":"hi","max_tokens":1}'
        content = small + b" " * (LIMIT - len(small))
    return [Case(path, content, chunked, ctype, other)]


# ---- sending and checking ---------------------------------------------------------------------


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # 4xx messages, their first words
    problems: list[str] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)  # the client's local ports: its connections

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def add(self, other: Tally) -> None:
        self.statuses += other.statuses
        self.errors += other.errors
        self.problems += other.problems


def _problem(case: Case, resp: httpx.Response) -> str | None:
    """What is wrong with the response to `case`, if anything."""
    if resp.headers.get("connection", "").lower() == "close":
        return "server closed the connection"
    if resp.status_code == 200:
        return _ok_problem(resp)
    if resp.status_code not in (400, 404, 413):
        return f"status {resp.status_code}"
    if case.kind == "oversize" and resp.status_code != 413:
        return f"oversize body got {resp.status_code}"
    try:
        body = resp.json()
    except ValueError:
        return "error body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict):
        return f"not an OpenAI error body: {body}"
    if set(error) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(error)}"
    if not (isinstance(error["message"], str) and error["message"] and error["type"]):
        return "error without message or type"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return "param / code not a string or null"
    return None


def _ok_problem(resp: httpx.Response) -> str | None:
    if not resp.headers["content-type"].startswith("text/event-stream"):
        body = resp.json()
        ok = len(body["choices"]) == 1 and body["usage"]["completion_tokens"] >= 1
        return None if ok else f"bad 200 body: {body}"
    text = resp.text
    if not text.endswith("data: [DONE]\n\n"):
        return "stream does not end with data: [DONE]"
    for event in text.split("\n\n")[:-2]:
        data = json.loads(event.removeprefix("data: "))
        if "error" in data:
            return f"in-stream error: {data}"
    return None


def _send(client: httpx.Client, batch: list[Case]) -> Tally:
    """Send `batch` in order over `client`'s connection; what came back."""
    tally = Tally()
    for case in batch:
        headers = {"content-type": case.content_type} if case.content_type else {}
        content: Any = iter([case.content]) if case.chunked else case.content
        try:
            resp = client.post(case.path, content=content, headers=headers)
        except httpx.TransportError as exc:
            tally.problems.append(f"{case.kind} {case.content[:200]!r}: dropped: {exc!r}")
            continue
        tally.ports.add(resp.extensions["network_stream"].get_extra_info("client_addr")[1])
        tally.statuses[resp.status_code] += 1
        if (problem := _problem(case, resp)) is not None:
            tally.problems.append(f"{case.kind} {case.content[:200]!r}: {problem}")
        elif resp.status_code != 200:
            tally.errors[" ".join(resp.json()["error"]["message"].split()[:3])] += 1
    return tally


# ---- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerThread.for_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), MODEL)
    yield srv
    srv.stop()


def _client(server: ServerThread) -> httpx.Client:
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    transport = httpx.HTTPTransport(socket_options=nodelay)
    return httpx.Client(base_url=server.url, timeout=60, transport=transport)


def test_fuzzed_bodies_get_no_5xx_no_drops_and_openai_errors(server: ServerThread) -> None:
    tally, start = Tally(), time.monotonic()
    clients = [_client(server) for _ in range(CONNECTIONS)]
    ports: list[set[int]] = [set() for _ in clients]
    pool = ThreadPoolExecutor(CONNECTIONS)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(cases(), min_size=BATCH, max_size=BATCH))
    def run(drawn: list[list[Case]]) -> None:
        batch = [case for pair in drawn for case in pair]
        slices = [batch[i::CONNECTIONS] for i in range(CONNECTIONS)]
        sent = list(pool.map(_send, clients, slices))
        for one, seen in zip(sent, ports, strict=True):
            tally.add(one)
            seen |= one.ports
        problems = [p for one in sent for p in one.problems]
        assert not problems, problems[:5]

    try:
        run()
    finally:
        pool.shutdown()
        for c in clients:
            c.close()
    elapsed = time.monotonic() - start
    print(f"\n{tally.sent} bodies in {elapsed:.1f} s; statuses {dict(tally.statuses)}")
    print("most common errors:", tally.errors.most_common(25))
    assert tally.sent >= WANT_BODIES
    assert all(len(p) == 1 for p in ports), "a client had to open a second connection"
    assert tally.statuses[200] > 0.1 * tally.sent  # the valid ones are not all rejected
    assert min(tally.statuses[s] for s in (400, 404, 413)) > 0


_DONE = re.compile(r"data: \[DONE\]\n\n$")


def test_oversize_body_is_413_and_the_connection_serves_on(server: ServerThread) -> None:
    """413 as soon as the body is known to be too large: from Content-Length, or counted
    when chunked; the rest is discarded and the same connection takes the next request."""
    ports = set()
    with _client(server) as client:
        for chunked in (False, True):
            content, _ = _oversize(10, declared=not chunked)
            body: Any = iter([content[:1000], content[1000:]]) if chunked else content
            resp = client.post(COMPLETIONS, content=body)
            assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
            ok = {"prompt": "hi", "max_tokens": 2, "stream": True}
            resp = client.post(COMPLETIONS, json=ok)
            assert resp.status_code == 200 and _DONE.search(resp.text)
            ports.add(resp.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1


def test_response_ids_are_the_servers(server: ServerThread) -> None:
    """Nothing a client sends names its request inside the server: ids are fresh uuids."""
    body = {"prompt": "hi", "max_tokens": 1, "user": "cmpl-0"}
    with _client(server) as client:
        ids = [client.post(COMPLETIONS, json=body).json()["id"] for _ in range(3)]
    assert len(set(ids)) == 3 and all(re.fullmatch(r"cmpl-[0-9a-f]{32}", i) for i in ids)
