"""A real Prometheus (the Debian package's binary) scraping a running `splitserve serve`, as an
operator sets it up: after the test's requests, Prometheus' query API holds the request
histograms with exactly that many requests, and one KV-use gauge per worker of /status.

    openai client ──N requests──> splitserve (router + prefill-0 + decode-0)
    prometheus ──GET /metrics every 1 s──> router ──/api/v1/query──> this test
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.server_process import ServerProcess, free_port

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
SCRAPE_INTERVAL_S = 1
N_REQUESTS = 5
QUERY_TIMEOUT_S = 30.0
# vLLM's TTFT buckets (the spec the router exports), and +Inf
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5]
TTFT_BUCKETS += [7.5, 10, 20, 40, 80, 160, 640, 2560, math.inf]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path:
        return path
    if os.geteuid() == 0:
        pytest.fail("no prometheus on PATH: `make setup` installs the Debian package (as root)")
    pytest.skip("no prometheus on PATH (not root): `sudo apt-get install prometheus` to run this")


class PrometheusProcess:
    """`prometheus` on a free port, scraping `target` (host:port) every SCRAPE_INTERVAL_S, its
    TSDB and log under `workdir`; `query(expr)` is the instant-query API's result list."""

    def __init__(self, binary: str, target: str, workdir: Path, ready_timeout_s: float = 30):
        config = workdir / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
            "scrape_configs:\n  - job_name: splitserve\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.base = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.base.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready in {timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, expr: str) -> list[dict]:
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def total(self, expr: str) -> float | None:
        """The sum of an instant query's values; None while it has no series yet."""
        result = self.query(expr)
        return sum(float(s["value"][1]) for s in result) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[ServerProcess, PrometheusProcess]]:
    binary = prometheus_binary()  # before the server: no minute spent on a skip
    with ServerProcess("--kv-cache-gb", "0.5", "--dtype", "float32") as server:
        prom = PrometheusProcess(
            binary, f"127.0.0.1:{server.port}", tmp_path_factory.mktemp("prometheus")
        )
        try:
            yield server, prom
        finally:
            prom.stop()


def router_metrics(server: ServerProcess, prefix: str) -> str:
    """The router's own /metrics lines starting with `prefix`, for failure messages."""
    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith(prefix))


def send_requests(server: ServerProcess) -> None:
    """N_REQUESTS real requests, streaming and not, completions and chat; all read to the end."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)
    chat = [{"role": "user", "content": "Name three colors."}]
    common = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    texts = [
        client.completions.create(prompt="The capital of France is", **common).choices[0].text,
        client.chat.completions.create(messages=chat, **common).choices[0].message.content,
        "".join(
            c.choices[0].text
            for c in client.completions.create(prompt="Water boils at", stream=True, **common)
            if c.choices
        ),
        "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(messages=chat, stream=True, **common)
            if c.choices
        ),
        "".join(
            c.choices[0].text
            for c in client.completions.create(
                prompt="def add(a, b):\n    return",
                stream=True,
                stream_options={"include_usage": True},
                **common,
            )
            if c.choices
        ),
    ]
    assert len(texts) == N_REQUESTS and all(texts), texts


def wait_for_total(prom: PrometheusProcess, server: ServerProcess, expr: str, want: int) -> None:
    """Poll until `expr` sums to `want` (bounded); more than `want` fails at once."""
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    got = prom.total(expr)
    while got != want and time.monotonic() < deadline:
        assert got is None or got < want, f"{expr} = {got} > {want} requests sent"
        time.sleep(0.5)
        got = prom.total(expr)
    assert got == want, (
        f"{expr} = {got} after {QUERY_TIMEOUT_S:.0f} s, want {want}; up = "
        f"{prom.query('up')}\nrouter /metrics:\n{router_metrics(server, 'vllm:time_to_first')}"
    )


def test_prometheus_scrapes_vllm_metrics(stack):
    server, prom = stack
    wait_for_total(prom, server, 'up{job="splitserve"}', 1)
    send_requests(server)

    ttft = "vllm:time_to_first_token_seconds"
    wait_for_total(prom, server, f"sum({ttft}_count)", N_REQUESTS)
    time.sleep(2.5 * SCRAPE_INTERVAL_S)  # later scrapes count no request twice
    assert prom.total(f"sum({ttft}_count)") == N_REQUESTS
    assert prom.total(f'sum({ttft}_bucket{{le="+Inf"}})') == N_REQUESTS

    # the buckets are vLLM's, cumulative, and the last one holds every request
    buckets = {float(s["metric"]["le"]): float(s["value"][1])
               for s in prom.query(f"sum by (le) ({ttft}_bucket)")}  # fmt: skip
    assert sorted(buckets) == TTFT_BUCKETS
    counts = [buckets[le] for le in TTFT_BUCKETS]
    assert counts == sorted(counts) and counts[-1] == N_REQUESTS, buckets

    # the request series name the model and the decode worker that served them
    status = server.status()
    roles = {w["name"]: w["role"] for w in status["workers"]}
    assert sorted(roles.values()) == ["decode", "prefill"], status["workers"]
    served = prom.query(f"{ttft}_count")
    assert {s["metric"]["model_name"] for s in served} == {MODEL}, served
    assert {roles.get(s["metric"]["engine"]) for s in served} == {"decode"}, served

    successes = prom.query("sum by (finished_reason) (vllm:request_success_total)")
    reasons = {s["metric"]["finished_reason"]: float(s["value"][1]) for s in successes}
    assert sum(reasons.values()) == N_REQUESTS, reasons
    assert {r for r, n in reasons.items() if n} <= {"stop", "length"}, reasons

    # one KV-use gauge per worker in /status, labelled with its role, a fraction
    usage = prom.query("vllm:kv_cache_usage_perc")
    engines = [s["metric"]["engine"] for s in usage]
    assert sorted(engines) == sorted(roles), (usage, status["workers"])
    for s in usage:
        assert s["metric"]["role"] == roles[s["metric"]["engine"]], s
        assert s["metric"]["model_name"] == MODEL, s
        assert 0.0 <= float(s["value"][1]) <= 1.0, s
