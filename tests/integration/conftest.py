"""Shared fixtures for integration tests: one local Ray cluster for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
RAY_METRICS_PORT: list[int] = []  # the session cluster's Prometheus export port, once started


@pytest.fixture(scope="session")
def ray_session():
    """ray.init(num_cpus=4) once per session (actors should ask for num_cpus=0.5).

    Workers get the repo root, tests/ and tests/integration/ on their path, so they
    can import the packages and unpickle actor classes defined in test modules."""
    import ray

    if not ray.is_initialized():
        paths = [_ROOT, _ROOT / "tests", _ROOT / "tests" / "integration"]
        extra = os.environ.get("PYTHONPATH", "")
        pythonpath = os.pathsep.join([*map(str, paths), *([extra] if extra else [])])
        from bench.server_process import free_port

        RAY_METRICS_PORT[:] = [free_port()]
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            _metrics_export_port=RAY_METRICS_PORT[0],  # Ray's Prometheus export of this node
            _system_config={"metrics_report_interval_ms": 1000},  # workers' metrics every 1 s
        )
    yield ray
    ray.shutdown()
