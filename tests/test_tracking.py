"""MLflow tracking against a real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1."""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.registry import tracking
from tests.fixtures.mlflow_server import free_port
from tests.model_helpers import tiny_model_dict

TINY = tiny_model_dict()


def _open(uri, job, params, exp="t-open"):
    return tracking.open_job_run(uri, exp, job, params, {"config.hash": "h"}, "a: 1\n")


def test_one_run_per_job_across_reopen(mlflow_uri):
    run_id, resumed = _open(mlflow_uri, "job-a", {"train.lr": 0.1, "train.max_steps": 10})
    assert not resumed
    again, resumed = _open(mlflow_uri, "job-a", {"train.lr": 0.1, "train.max_steps": 20, "new.key": 1})
    assert resumed and again == run_id
    other, _ = _open(mlflow_uri, "job-b", {"train.lr": 0.1})
    assert other != run_id
    run = MlflowClient(mlflow_uri).get_run(run_id)
    # a param is never changed (MLflow forbids it); the change is recorded instead and new keys are added
    assert run.data.params["train.max_steps"] == "10" and run.data.params["new.key"] == "1"
    changes = [json.loads(v) for k, v in run.data.tags.items() if k.endswith("changed_params")]
    assert changes == [{"train.max_steps": {"logged": "10", "now": "20"}}]
    assert run.data.tags[tracking.JOB_TAG] == "job-a" and run.info.status == "RUNNING"


def test_a_job_without_checkpoints_gets_a_fresh_run(mlflow_uri):
    old, _ = _open(mlflow_uri, "job-wiped", {"train.lr": 0.1})
    # the job's storage was wiped: training restarts at step 0, so it must not continue the old step axis
    new, resumed = tracking.open_job_run(mlflow_uri, "t-open", "job-wiped", {"train.lr": 0.2}, {}, "", fresh=True)
    assert new != old and not resumed
    client = MlflowClient(mlflow_uri)
    retired = client.get_run(old)
    assert tracking.JOB_TAG not in retired.data.tags and retired.data.tags[f"{tracking.JOB_TAG}.retired"] == "job-wiped"
    assert retired.info.status == "KILLED"
    again, resumed = _open(mlflow_uri, "job-wiped", {"train.lr": 0.2})
    assert again == new and resumed


def test_replayed_steps_are_dropped_per_metric(mlflow_uri):
    run_id, _ = _open(mlflow_uri, "job-replay", {})
    first = tracking.RankZeroLogger(mlflow_uri, run_id, active=True)
    for s in range(1, 11):
        first.log_metrics({"loss": 100.0 - s}, step=s)
    first.log_metrics({"valid": 5.0}, step=10)
    first.flush()  # the sender thread has delivered them (a worker group's end of job)
    # a restarted worker group resumes from the step-6 checkpoint and replays steps 7..10 before going on
    second = tracking.RankZeroLogger(mlflow_uri, run_id, active=True)
    for s in range(7, 16):
        second.log_metrics({"loss": 200.0 + s, "valid": 1.0}, step=s)
    second.flush()
    tracking.RankZeroLogger(mlflow_uri, run_id, active=False).log_metrics({"loss": -1.0, "rank1": 1.0}, step=99)
    client = MlflowClient(mlflow_uri)
    loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    steps = sorted(s for s, _ in loss)
    assert steps == list(range(1, 16))  # unique and complete: one value per step
    assert dict(loss)[10] == 90.0 and dict(loss)[11] == 211.0  # replay dropped, new steps kept
    assert sorted(m.step for m in client.get_metric_history(run_id, "valid")) == list(range(10, 16))
    assert client.get_metric_history(run_id, "rank1") == []


def test_down_server_fails_fast():
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="tracking.uri: .*unreachable"):
        tracking.open_job_run(dead, "e", "j", {}, {}, "")
    assert time.monotonic() - t0 < 10


def test_registered_model_loads_by_alias_in_a_clean_process(mlflow_uri, tmp_path):
    from kpp.config import KanervaConfig
    from kpp.model import KanervaPlusPlus
    torch.manual_seed(0)
    cfg = KanervaConfig.from_dict(TINY)
    model = KanervaPlusPlus(cfg).eval()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    run_id, _ = _open(mlflow_uri, "job-reg", {}, exp="t-reg")
    name = "kpp-test-reg"
    v1 = tracking.register_model(mlflow_uri, run_id, weights, cfg.to_dict(), name, "candidate")
    # a re-run of a finished job does not register the same run twice...
    assert tracking.register_model(mlflow_uri, run_id, weights, cfg.to_dict(), name, "candidate") == v1
    # ...unless asked to
    v2 = tracking.register_model(mlflow_uri, run_id, weights, cfg.to_dict(), name, "candidate", force_new=True)
    assert int(v2) == int(v1) + 1
    mv = MlflowClient(mlflow_uri).get_model_version_by_alias(name, "candidate")
    assert mv.version == v2 and mv.run_id == run_id

    x = (torch.rand(3, 4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.5).float().numpy()
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(7)
        expected = model(torch.as_tensor(x))["total"].numpy()
    # a fresh interpreter that knows only the tracking URI, outside the repo (the model carries its kpp code)
    script = textwrap.dedent(f"""
        import mlflow, numpy as np
        m = mlflow.pyfunc.load_model("models:/{name}@candidate")
        x = np.load("x.npy")
        np.save("y.npy", m.predict(x, params={{"seed": 7}}))
        np.save("y1.npy", m.predict(x[:1], params={{"seed": 7}}))  # any batch size (torch.export would freeze it)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_uri
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=120)
    got = np.load(tmp_path / "y.npy")
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.load(tmp_path / "y1.npy").shape == (1, 4)


def test_a_url_with_a_token_never_reaches_params_tags_or_the_stored_config(mlflow_uri, tmp_path):
    from pipeline.train import config
    secret = "s3cr3t-t0ken"
    cfg = config.load(None, [f"data.source=https://reader:{secret}@data.example/mnist",
                             f"data.shards=s3://bucket/x?X-Amz-Signature={secret}"])
    run_id, _ = tracking.open_job_run(mlflow_uri, "t-redact", "job-r", cfg.flat(),
                                      {"data.manifest": f"https://{secret}@host/m.parquet"},
                                      tracking.config_yaml(cfg.to_dict()))
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.params["data.source"] == "https://reader:***@data.example/mnist"
    assert secret not in json.dumps(run.data.params) and secret not in json.dumps(run.data.tags)
    stored = client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))
    text = open(stored).read()
    assert secret not in text and "https://reader:***@data.example/mnist" in text
