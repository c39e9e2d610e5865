"""Shared pytest setup. Service fixtures (S3 endpoint, MLflow server, Ray cluster) live in tests/fixtures/,
one module per service, and are registered here."""
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
