"""research.memory_report turns research.memory_experiment's JSON into the doc's tables and curve, for every model kind."""
import json

from research import memory_report


def record(name, writer, steps, neg_elbo, per_key, device="cpu"):
    test = {"neg_elbo": neg_elbo, "iwae": neg_elbo - 5, "recon": neg_elbo - 20, "kl_z": 12.0,
            "kl_y": sum(per_key), "swap_gap": 0.0 if writer in ("none", "vae") else 100.0,
            "loo_neg_elbo": neg_elbo + 50, "loo_iwae": neg_elbo + 40}
    test.update({f"kl_y_key{k}": v for k, v in enumerate(per_key)})
    return {"name": name, "device": device, "test": test, "train_seconds": 600.0, "keys_at_floor": [],
            "test_images": 2000,
            "model_config": {"memory": {"writer": writer}, "keys": {"num_reads": 2},
                             "objective": {"kl_warmup_steps": 900}},
            "train_config": {"steps": steps, "batch_size": 16}}


def test_rows_for_kpp_dkm_and_vae(tmp_path):
    records = [record("k", "key", 2280, 82.61, [0.47, 7.75]), record("d", "dkm", 2280, 106.04, [10.12]),
               record("v", "vae", 2280, 98.29, [])]
    paths = []
    for r in records:
        paths.append(tmp_path / f"{r['name']}.json")
        paths[-1].write_text(json.dumps(r))
    table = memory_report.table(memory_report.load([str(p) for p in paths])).splitlines()
    by_name = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert "| 82.61 |" in by_name["k"] and "8.22 (0.47 / 7.75)" in by_name["k"] and "+100.00" in by_name["k"]
    assert "10.12 (10.12)" in by_name["d"]
    assert "0.00 (-)" in by_name["v"] and "+0.00" in by_name["v"]


def test_curve_of_gpu_records_is_written(tmp_path):
    records = [record(f"{w}{s}", w, s, e, [0.5, 7.0], device="cuda") | {"device_name": "NVIDIA H100 80GB HBM3"}
               for w, s, e in (("key", 1000, 99.6), ("none", 1000, 100.0), ("key", 2280, 82.9), ("none", 2280, 94.9))]
    out = memory_report.plot_curve(records, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 10_000 and out.endswith("curve.png")
