"""The demo job runs end to end on the bundled data and leaves what it promises: bounds, a model, a sample grid."""
import json

from PIL import Image

from jobs import demo
from kpp.checkpoint import load_model
from kpp.viz import ROW_LABELS


def test_demo_smoke_run_writes_bounds_model_and_grid(tmp_path, capsys):
    result = demo.main(["--steps", "4", "--test-episodes", "2", "--iwae-samples", "8", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for label in ("chain -ELBO (x_t from a memory of the images before it", "leave-one-out -ELBO",
                  "memory-conditional -ELBO (x_t in its own memory; the paper's quantity)"):
        assert label in printed
    bounds = json.loads((tmp_path / "bounds.json").read_text())
    assert bounds["dataset"] == "digits/train" and bounds["neg_elbo"] == result["neg_elbo"]
    assert bounds["iwae"] <= bounds["neg_elbo"]
    model = load_model(tmp_path / "model.pt")
    grid = Image.open(tmp_path / "samples.png")
    rows, cols = len(ROW_LABELS), model.cfg.episode_length
    assert grid.size == (2 * (cols * 30 + 2), 2 * (rows * 30 + 2))  # 28px cells, 2px padding, scaled x2


def test_demo_reads_a_standard_dataset_directory(tmp_path, shared_data):
    result = demo.main(["--source", str(shared_data / "binarized_mnist"), "--steps", "2", "--test-episodes", "2",
                        "--iwae-samples", "2", "--out", str(tmp_path)])
    assert result["unit"] == "nats/image"
    assert json.loads((tmp_path / "bounds.json").read_text())["dataset"] == "binarized_mnist/train"
