"""Every user entry point answers --help without torch: a user checks the options (or a config, before Ray) on a
machine or image without the model's dependencies, and --help must not wait for torch to import."""
import subprocess
import sys

import pytest

from tests.infra_helpers import REPO

JOBS = ["train", "tune", "prepare", "submit", "evaluate", "generate", "inspect", "promote"]

NO_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"{name} is not importable in this test")
sys.meta_path.insert(0, NoTorch())
sys.argv = [sys.argv[1], "--help"]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("job", JOBS)
def test_help_runs_with_torch_unimportable(job):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, f"jobs.{job}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage:" in r.stdout and "--help" in r.stdout, r.stdout[-2000:]
