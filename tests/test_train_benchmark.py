"""The training benchmark runs end to end: the Ray Train job and the plain torchrun loop do the same work (same
final loss, to float tolerance) and the report holds what the README promises. Times are reported, never asserted."""
import json
import subprocess
import sys
import pytest

# these tests start Ray clusters, a local stack or jobs of their own (tests/conftest.py: make test-unit skips them)
pytestmark = pytest.mark.services


def test_ray_and_torchrun_sides_do_identical_work(tmp_path):
    out = tmp_path / "train.json"
    result = subprocess.run([sys.executable, "-m", "research.benchmark_train", "--steps", "6", "--repeats", "1",
                             "--workers", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads(out.read_text())["by_workers"]["1"]
    assert one["same_final_loss"], one["runs"]
    (torchrun,), (ray_train,) = one["runs"]["torchrun"], one["runs"]["ray_train"]
    assert abs(torchrun["final_loss"] - ray_train["final_loss"]) < 1e-3
    for side in (torchrun, ray_train):
        assert 0 < side["loop_s"] < side["wall_s"]
        assert 0 < side["on_cpu_share_rank0"] <= 1.05  # CPU seconds of one thread over wall seconds
    assert one["loop_time_ratio_ray_over_torchrun"] == ray_train["loop_s"] / torchrun["loop_s"]
