"""`splitserve serve --address` on a real three-node Ray cluster on loopback addresses:

    127.0.0.2  head (the router's node)
    127.0.0.3  marked for prefill   (--resources '{"splitserve_prefill": 1000}')
    127.0.0.4  marked for decode    (--resources '{"splitserve_decode": 1000}')

Prefill workers run only on the prefill node and decode workers only on the decode node,
KV crosses nodes to the decode node's own address, streamed greedy text equals offline
`LLM.generate`, `splitserve scale` grows and shrinks the pools on their nodes, and bad
input (a count below a pool's minimum, an unreachable --address, a role no node has)
is one line on stderr with the running server untouched."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest
from ray_nodes import RayNodes
from tiny_model import make_tiny_checkpoint

from bench.server_process import ServerProcess
from engine import LLM, SamplingParams

PREFILL_IP, DECODE_IP = "127.0.0.3", "127.0.0.4"
PROMPTS = [[5, 9, 14, 33, 70, 12, 8, 90, 41, 3, 77] * 3, [100, 101, 102, 7], [60] * 40]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = RayNodes(tmp_path_factory.mktemp("ray"))
    try:
        nodes.start_head(num_cpus=1)
        nodes.add_node(PREFILL_IP, resources='{"splitserve_prefill": 1000}')
        nodes.add_node(DECODE_IP, resources='{"splitserve_decode": 1000}')
        yield nodes
    finally:
        nodes.stop()


def _serve_args(cluster, tiny, *extra: str) -> list[str]:
    return [
        f"--address={cluster.address}",
        f"--node-ip-address={cluster.head_ip}",
        f"--model={tiny}",
        "--block-size=4",
        "--kv-cache-gb=0.05",
        "--placement=roles",
        "--cpus-per-worker=0.3",
        *extra,
    ]


@pytest.fixture(scope="module")
def server(cluster, tiny):
    with ServerProcess(*_serve_args(cluster, tiny), env=cluster.env, start_timeout_s=300) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(tiny):
    llm = LLM(model=str(tiny), block_size=4, num_kv_blocks=256, num_threads=1)
    return [o.text for o in llm.generate(PROMPTS, PARAMS)]


def _stream_texts(server, model) -> list[str]:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="-", timeout=120)
    texts = []
    for ids in PROMPTS:
        chunks = client.completions.create(
            model=str(model),
            prompt=ids,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        texts.append("".join(c.choices[0].text for c in chunks if c.choices))
    return texts


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _check_placement(status: dict) -> None:
    for w in status["workers"]:
        assert w["state"] == "active", w
        if w["role"] == "prefill":
            assert w["node"] == PREFILL_IP, w
        else:
            assert w["role"] == "decode" and w["node"] == DECODE_IP, w
            kv = w["endpoint"]  # gRPC host:port, or ray://node/actor for collective
            assert kv.startswith((f"{DECODE_IP}:", f"ray://{DECODE_IP}/")), w


def test_workers_run_on_their_role_nodes_and_stream_offline_greedy_text(server, tiny, offline):
    status = server.status()
    assert status["pools"] == {"prefill": 1, "decode": 1}
    _check_placement(status)
    assert _stream_texts(server, tiny) == offline
    server.wait_no_kv_held()


def test_collective_transport_meets_across_nodes(server, cluster, tiny, offline):
    """A second server on the same cluster (its own namespace), KV over ray.util.collective
    (gloo here): its rendezvous runs between the prefill and the decode node."""
    args = _serve_args(cluster, tiny, "--kv-transport=collective", "--namespace=second")
    with ServerProcess(*args, env=cluster.env, start_timeout_s=300) as second:
        _check_placement(second.status())
        assert _stream_texts(second, tiny) == offline
        second.wait_no_kv_held()


def test_a_second_server_in_the_same_namespace_is_one_line(server, cluster, tiny):
    out = _cli("serve", *_serve_args(cluster, tiny), env=cluster.env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "give this one --namespace" in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert server.status()["pools"] == {"prefill": 1, "decode": 1}  # the first one is untouched


def test_scale_grows_and_shrinks_pools_on_their_nodes(server):
    grown = _cli("scale", "--url", server.base, "--prefill", "2", "--decode", "2")
    assert grown.returncode == 0, grown.stderr
    assert "prefill 2" in grown.stdout and "decode 2" in grown.stdout
    status = server.status()
    assert sorted(w["name"] for w in status["workers"]) == [
        "decode-0",
        "decode-1",
        "prefill-0",
        "prefill-1",
    ]
    _check_placement(status)
    table = _cli("status", "--url", server.base)
    assert table.returncode == 0 and DECODE_IP in table.stdout and PREFILL_IP in table.stdout
    shrunk = _cli("scale", "--url", server.base, "--prefill", "1", "--decode", "1")
    assert shrunk.returncode == 0, shrunk.stderr
    assert server.status()["pools"] == {"prefill": 1, "decode": 1}


def test_bad_scale_is_one_line_and_leaves_the_server_as_it_was(server):
    before = [w["name"] for w in server.status()["workers"]]
    for args in (["--prefill", "0"], ["--decode", "-3"], ["--colocated", "2"]):
        out = _cli("scale", "--url", server.base, *args)
        assert out.returncode == 2, out
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert [w["name"] for w in server.status()["workers"]] == before


def test_unreachable_address_is_one_line():
    out = _cli("serve", "--address", "127.0.0.9:1")
    assert out.returncode == 2
    assert out.stderr.startswith("error: cannot reach the Ray cluster at 127.0.0.9:1")
    assert out.stderr.count("\n") == 1, out.stderr


def test_a_role_that_no_node_has_is_one_line(cluster, tiny):
    """The same cluster without its decode node's mark: --placement roles refuses to start."""
    temp_dir = cluster.temp_dir.parent / "unmarked"
    temp_dir.mkdir(exist_ok=True)
    nodes = RayNodes(temp_dir)
    try:
        nodes.start_head(num_cpus=1)
        out = _cli(
            "serve",
            f"--address={nodes.address}",
            f"--node-ip-address={nodes.head_ip}",
            f"--model={tiny}",
            "--placement=roles",
            env=nodes.env,
        )
    finally:
        nodes.stop()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no node of the cluster offers the prefill role's resource" in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
