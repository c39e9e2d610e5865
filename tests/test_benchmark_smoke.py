"""jobs.benchmark keeps working: the tiny profile runs every section end to end in a subprocess and writes the JSON
and the Markdown table; bad input is refused (exit 2, a clear message) before anything trains. The real profiles
(cpu-small, gpu) are never run by the test suite. Times are reported, never asserted."""
import json
import math
import subprocess
import sys
import pytest

from kpp import KanervaConfig

# these tests start Ray clusters, a local stack or jobs of their own (tests/conftest.py: make test-unit skips them)
pytestmark = pytest.mark.services


ROWS = ["kpp", "dkm", "dkm_plain", "km", "vae", "none"]  # K++, DKM w/ TSM, DKM, KM, VAE, K++ with no memory


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jobs.benchmark", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_profile_writes_json_and_table(tmp_path):
    r = bench("--profile", "tiny", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "tiny.json").read_text())
    table = (tmp_path / "tiny.md").read_text()
    for dataset, unit in (("binarized_mnist", "nats/image"), ("fashion_mnist", "bits/dim")):
        runs = report["quality"][dataset]
        assert list(runs) == ROWS  # the paper table's rows, in its order
        for name, run in runs.items():
            assert run["unit"] == unit
            for budget in ("equal_steps", "equal_time"):
                b = run[budget]
                # S = 2 samples on 8 images: the sampled IWAE may sit a little above the analytic-KL ELBO
                assert math.isfinite(b["neg_elbo"]) and b["iwae"] <= 1.01 * b["neg_elbo"] and b["train_s"] > 0
                assert math.isfinite(b["chain_neg_elbo"]) and math.isfinite(b["loo_neg_elbo"])
            assert run["equal_steps"]["steps"] == 3 if dataset == "binarized_mnist" else 2
        assert runs["vae"]["equal_steps"]["swap_gap"] == 0.0 == runs["none"]["equal_steps"]["swap_gap"]  # no memory
        assert all(runs[name]["equal_steps"]["kl_m"] > 0 for name in ("dkm", "dkm_plain", "km"))  # a memory KL
    assert set(report["speed"]["models"]) == set(ROWS)
    assert report["speed"]["ratios"]["kpp_over_vae_step_time"] > 0
    parts = report["profile_breakdown"]["ms_per_step"]
    assert {"backward", "decoder", "encoder (+ key and z heads)", "STN read + prior p(z | reads)"} <= set(parts)
    assert report["loader"]["supply_over_consumption"] > 0
    one = report["ray_vs_torchrun"]["by_workers"]["1"]
    assert one["same_final_loss"]
    # launch -> first step: positive, and less than the whole run (start-up, tear-down and loop)
    for side, best in one["summary_best_of_repeats"].items():
        first = one["launch_to_first_step_s"][side]
        assert 0 < first < one["fixed_overhead_s"][side] + best["loop_s"], (side, first, one)
    assert "## Quality at equal budget" in table and "Ray Train vs plain torchrun" in table
    assert "| chain -ELBO | chain IWAE | LOO -ELBO | memory-conditional -ELBO | IWAE |" in table  # the three bounds
    for label in ("K++", "DKM w/ TSM", "DKM", "KM", "VAE"):
        assert f"| {label} | equal steps |" in table, label


def test_bad_input_is_refused_before_training(tmp_path):
    for args, message in ((["--profile", "huge"], "unknown profile 'huge'"),
                          (["--profile", "tiny", "--models", "kpp,lstm"], "unknown model lstm"),
                          (["--profile", "tiny", "--datasets", "cifar"], "unknown dataset cifar"),
                          (["--profile", "tiny", "--workers", "1,4096"], "asks for 4096 workers"),
                          (["--profile", "tiny", "--sections", "quality,everything"], "unknown section")):
        r = bench(*args, "--out", str(tmp_path), timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-2000:])
    assert not list(tmp_path.iterdir())  # nothing written, nothing trained


def test_a_gpu_profile_on_a_machine_without_enough_gpus_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    r = bench("--profile", "gpu", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "needs 1 GPU(s); this machine has 0" in r.stderr, r.stderr[-2000:]


def test_step_speed_against_another_tree_writes_every_ratio(tmp_path):
    """research.step_speed_vs_tree with this tree as its own 'before' (one round, one timed step): the four timings
    run, each in its own process, and the JSON holds every ratio (equal trees: after/before near 1 is not asserted,
    times on shared cores are not)."""
    out = tmp_path / "before_after.json"
    r = subprocess.run([sys.executable, "-m", "research.step_speed_vs_tree", "--before", ".", "--rounds", "1",
                        "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"before", "after", "vae_after", "reference"}
    assert report["runs"]["after"][0]["num_reads"] == KanervaConfig().keys.num_reads
    assert report["runs"]["reference"][0]["num_reads"] is None
    assert all(v > 0 and math.isfinite(v) for v in report["ratios"].values()), report["ratios"]
    bad = subprocess.run([sys.executable, "-m", "research.step_speed_vs_tree", "--before", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--before: no kpp/ in it" in bad.stderr


def test_the_gpu_loop_check_runs_end_to_end(tmp_path):
    """research.gpu_loop_check is spent on scarce GPU minutes: its code path runs here first (CPU, tiny model)."""
    out = tmp_path / "gpu_loop.json"
    r = subprocess.run([sys.executable, "-m", "research.gpu_loop_check", "--data", "random", "--steps", "6",
                        "--log-every", "3", "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["loop_ms_per_step"] > 0 and report["step_ms"] > 0 and report["host_syncs_warned"] == 0
    assert math.isclose(report["loop_over_step"], report["step_ms"] / report["loop_ms_per_step"])
    bad = subprocess.run([sys.executable, "-m", "research.gpu_loop_check", "--data", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--data: no such directory" in bad.stderr
