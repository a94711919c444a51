"""Shared fixtures for integration tests: one local Ray cluster for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]


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
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
    yield ray
    ray.shutdown()
