"""Shared pytest setup. Service fixtures (S3 endpoint, MLflow server, Ray cluster) live in tests/fixtures/,
one module per service, and are registered here.

Every test that needs a service is marked `services` here, from the fixtures it uses (directly or through
another fixture); a module that starts services of its own (a local stack, a job's own Ray cluster) says so with
`pytestmark = pytest.mark.services`. `make test-unit` runs the rest: `-m "not services and not slow"`."""
import os
import pathlib

import pytest

# Fixture modules register themselves by being listed here; each starts a real service on 127.0.0.1.
pytest_plugins = [
    f"tests.fixtures.{p.stem}"
    for p in sorted((pathlib.Path(__file__).parent / "fixtures").glob("*.py"))
    if p.stem != "__init__"
]

# Real data lives beside the repository (../shared/data), never inside it.
SHARED_DATA = pathlib.Path(os.environ.get("KPP_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set KPP_SHARED_DATA)")
    return SHARED_DATA


# the session's real services: a test whose fixture closure holds one of these talks to a running server
SERVICE_FIXTURES = {"s3", "mlflow_server", "restartable_mlflow", "mlflow_s3_server", "ray_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
