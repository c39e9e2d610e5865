"""The deployment files agree with the code: they parse, point at real configs and carry the Train settings."""
import pathlib

import yaml

from pipeline.cluster.driver import RAY_ENV

INFRA = pathlib.Path(__file__).resolve().parents[1] / "infra"


def test_runtime_env_carries_the_train_settings():
    """The cluster-side manifests (infra/kuberay/, infra/launcher/) are checked by tests/test_infra_*.py."""
    runtime_env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"] == {**runtime_env["env_vars"], **RAY_ENV}
    assert ".git" in runtime_env["excludes"]  # working_dir is capped at 100 MiB (ray #45602)


def test_a_local_job_prints_no_state_api_warnings(tmp_path, ray_cluster):
    """Train V2's placement-group cleaner warned several times a second for the whole job on a local cluster
    without a dashboard, and failed to stop at tear-down when Ray's "auto" address pointed at a dead head
    (infra.local_stack.RayHead.stop) or several clusters ran on the machine ("Found multiple active Ray instances":
    the session's cluster runs beside this one here): `make demo` printed nothing else. A fresh process, its own
    cluster."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/local.yaml", "train.max_steps=20",
         "train.warmup_steps=5", "name=quiet", f"checkpoint.storage_path={tmp_path}", "tracking.enabled=false",
         "data.valid_episodes=4", "data.test_episodes=4", "eval.iwae_samples=2"],
        capture_output=True, text=True, timeout=300, env={**env, "RAY_AUTH_MODE": "disabled"},
        cwd=pathlib.Path(__file__).parents[1])
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "finished at step 20" in out
    assert out.count("first step done") == 1, out[-3000:]  # rank 0 prints it once; Train V2 doubled each line
    assert "PlacementGroupCleaner" not in out and "Failed to query Ray Train Controller" not in out, out[-3000:]
    assert "multiple active Ray instances" not in out, out[-3000:]
