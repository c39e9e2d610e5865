"""The data benchmark runs end to end and writes the JSON it promises. Speeds are reported, never asserted."""
import json
import subprocess
import sys


def test_benchmark_writes_a_report_for_each_store(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "research.benchmark_data", "--datasets", "binarized_mnist",
                             "--workers", "0", "--epochs", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(r["dataset"], r["store"], r["workers"]) for r in report["runs"]] == [
        ("binarized_mnist", "local", 0), ("binarized_mnist", "s3", 0)]
    for run in report["runs"]:
        (epoch,) = run["epochs"]
        assert epoch["images"] == 50_000  # a whole training epoch was read
        assert epoch["bytes"] == 5 * 1_249_280  # the five bit-packed 10k-image shards, each fetched once
        assert run["best_epoch_images_per_s"] > 0 and run["best_epoch_MB_per_s"] > 0
    assert set(json.loads(result.stdout)) == {"binarized_mnist/local/w0", "binarized_mnist/s3/w0"}
