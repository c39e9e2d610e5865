"""Using registered models end to end: a digits model trained by the real driver on the session's Ray cluster,
registered on a real MLflow server whose artifacts live on the S3 endpoint, then evaluated, drawn and promoted
by the jobs that consume `models:/NAME@ALIAS`: a clean process with nothing but MLFLOW_TRACKING_URI evaluates it,
Ray workers evaluate it, bad input exits 2 naming the mismatch.

The model is the demo's (jobs/configs/local.yaml) trained for 24 steps on one worker; numbers are compared with the
ones its own training run recorded, on the same test episodes.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.registry import naming, promotion

REPO = pathlib.Path(__file__).resolve().parents[1]
PREFIX = "kpp-t"
NAME = f"{PREFIX}-digits"


def _prepare(dataset, source, out, **options):
    from pipeline.data.shards.prepare import PrepareConfig, prepare
    prepare(PrepareConfig(dataset=dataset, source=source, out=str(out), episode_length=8, progress=False,
                          source_options=options))
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Local prepared datasets: the bundled digits (the model's data); a tiny Omniglot in its official layout,
    resized to the digits' 28x28 binary images (another dataset, the same shape); an 8-bit 16x16 .npz."""
    root = tmp_path_factory.mktemp("data")
    from tests.test_sources_more import omniglot_png
    seed = 0
    for folder, alphabets in {"images_background": {"Latin": 3, "Greek": 3}, "images_evaluation": {"Tengwar": 2}}.items():
        for alphabet, characters in alphabets.items():
            for c in range(characters):
                path = root / "omniglot-src" / folder / alphabet / f"character{c + 1:02d}"
                path.mkdir(parents=True)
                for drawer in range(1, 21):
                    seed += 1
                    (path / f"{seed:04d}_{drawer:02d}.png").write_bytes(omniglot_png(seed))
    rng = np.random.default_rng(0)
    np.savez(root / "grey.npz", **{f"x_{s}": rng.integers(0, 256, (64, 16, 16), dtype=np.uint8)
                                   for s in ("train", "valid", "test")})
    return {"digits": _prepare("digits", None, root / "digits"),
            "omniglot": _prepare("omniglot", str(root / "omniglot-src"), root / "omniglot", resize=28),
            "grey": _prepare("npz", str(root / "grey.npz"), root / "grey")}


@pytest.fixture(scope="module")
def trained(ray_cluster, mlflow_s3_server, data, tmp_path_factory):
    """The demo model trained 24 steps on digits, registered as kpp-t-digits (alias candidate)."""
    from pipeline.cluster import driver
    from pipeline.train import config
    cfg = config.load(str(REPO / "jobs/configs/local.yaml"), [
        "name=registered-digits", f"data.shards={data['digits']}", "data.valid_episodes=8", "data.test_episodes=8",
        "train.max_steps=24", "train.warmup_steps=4", "train.log_every=6", "model.objective.kl_warmup_steps=8",
        "scaling.num_workers=1", "scaling.cpus_per_worker=0.49", "checkpoint.every_steps=0",
        f"checkpoint.storage_path={tmp_path_factory.mktemp('ray')}", "eval.every_steps=12", "eval.iwae_samples=8",
        f"tracking.uri={mlflow_s3_server.url}", "tracking.experiment=t-registered",
        f"tracking.registered_model={PREFIX}", "tracking.images_every_steps=12"])
    out = driver.run(cfg)
    assert out.finished and out.model_name == NAME, (out.finished, out.model_name)
    return out


@pytest.fixture
def uri(mlflow_s3_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3_server.url)
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    return mlflow_s3_server.url


def clean_env(tracking_uri):
    """What a user's shell would hold: no AWS settings, no Ray address, only the tracking URI of MLflow's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "PYTHONPATH"))}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def test_training_registers_a_tagged_version_under_the_dataset_name(trained, uri, data, s3, mlflow_s3_server):
    client = MlflowClient(uri)
    mv = client.get_model_version(NAME, trained.model_version)
    t = mv.tags
    assert (t["dataset"], t["image_shape"], t["bit_depth"], t["likelihood"]) == ("digits", "1x28x28", "1", "bernoulli")
    for bound in promotion.BOUNDS:  # chain, leave-one-out and memory-conditional, each -ELBO and IWAE
        assert float(t[promotion.bound_tag(bound)]) == pytest.approx(trained.metrics[f"test/{bound}"], abs=1e-5), bound
    assert float(t[naming.SWAP_GAP]) == pytest.approx(trained.metrics["test/swap_gap"], abs=1e-5)
    assert t[naming.TRAINING_RUN] == trained.run_id == mv.run_id and len(t[naming.GIT_COMMIT]) == 40
    assert len(t[promotion.EPISODES_TAG]) == 16 and t[naming.TEST_EPISODES] == "8" and t[naming.DATA_URL] == data["digits"]
    # and says the same in words, on the version and (once) on the registered model
    assert "on digits 1x28x28" in mv.description
    assert f"chain bound {trained.metrics['test/chain_neg_elbo']:.2f}" in mv.description
    assert f"memory-conditional bound {trained.metrics['test/neg_elbo']:.2f}" in mv.description
    assert f"MLflow run {trained.run_id}" in mv.description
    assert "trained on digits" in client.get_registered_model(NAME).description
    # the first version of the name is champion as well as candidate (nothing to beat)
    assert trained.champion.promoted and client.get_model_version_by_alias(NAME, "champion").version == mv.version
    assert client.get_model_version_by_alias(NAME, "candidate").version == mv.version
    # an Omniglot job registers under another name: its resolved config takes the dataset from the prepared
    # data's card, whatever data.dataset says
    from pipeline.cluster import driver
    from pipeline.train import config
    other = config.load(None, [f"data.shards={data['omniglot']}", f"tracking.registered_model={PREFIX}"])
    assert other.data.dataset == "digits" and naming.registered_name(driver.resolved(other)) == f"{PREFIX}-omniglot" != NAME
    # the artifacts are on S3 behind the server (the client never touched S3)
    import boto3
    bucket = mlflow_s3_server.artifacts.split("/")[2]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.key,
                                           aws_secret_access_key=s3.secret, region_name=s3.region)
            .list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("artifacts/weights.pt") for k in keys), keys[:5]
    # training logged the labelled grid and the memory/keys figure as image series over steps
    images = [a.path for a in client.list_artifacts(trained.run_id, "images")]
    for key in ("samples", "memory_keys"):
        for step in (12, 24):
            assert any(p.startswith(f"images/{key}+step+{step}+") and p.endswith(".png") for p in images), images
    assert "samples/final.png" in {a.path for a in client.list_artifacts(trained.run_id, "samples")}


def test_a_clean_process_evaluates_by_alias_and_matches_the_training_bound(trained, uri, data, tmp_path):
    out = tmp_path / "eval.json"
    env = clean_env(uri)
    assert not any(k.startswith("AWS_") for k in env)
    r = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--model", f"models:/{NAME}@candidate", "--data",
                        data["digits"], "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    m = trained.metrics
    assert result["same_episodes_as_recorded"] and result["episodes"] == 8 and result["iwae_samples"] == 8
    assert result["unit"] == "nats/image" and result["version"] == trained.model_version
    for key in ("chain_neg_elbo", "chain_iwae", "neg_elbo", "iwae", "loo_neg_elbo", "swap_gap"):
        b, recorded = result["bounds"][key], m[f"test/{key}"]
        # the same episodes and the same draws as the training's final evaluation: equal up to float rounding,
        # far inside the interval's sampling tolerance
        assert abs(b["mean"] - recorded) <= 1e-4 * abs(recorded) + 2e-3, (key, b["mean"], recorded)
        assert b["low"] <= recorded <= b["high"] and b["half_width"] > 0
    assert "chain -ELBO" in r.stdout and "leave-one-out -ELBO" in r.stdout and "memory-conditional -ELBO" in r.stdout
    assert "95% interval" in r.stdout
    # the evaluation run, linked to the version
    client = MlflowClient(uri)
    run = client.get_run(result["evaluation_run_id"])
    assert run.data.tags["kpp.model.name"] == NAME and run.data.tags["kpp.model.version"] == trained.model_version
    assert run.data.tags["kpp.model.training_run_id"] == trained.run_id
    for key in ("chain_neg_elbo", "neg_elbo"):
        assert run.data.metrics[f"test/{key}"] == pytest.approx(result["bounds"][key]["mean"])
    assert client.get_model_version(NAME, trained.model_version).tags["evaluation.last_run_id"] == run.info.run_id


def test_iwae_is_below_the_elbo_and_tightens_with_samples(trained, uri, data):
    from pipeline.registry import evaluation, loading
    reg = loading.load(f"models:/{NAME}@candidate")
    tests = evaluation.test_set(reg, data["digits"])
    runs = {s: evaluation.evaluate(reg, tests, iwae_samples=s, leave_one_out=False) for s in (1, 10, 100)}
    elbo = runs[1]["bounds"]["neg_elbo"]
    iwae = {s: r["bounds"]["iwae"]["mean"] for s, r in runs.items()}
    assert all(r["bounds"]["neg_elbo"]["mean"] == elbo["mean"] for r in runs.values())  # the same first draw
    assert iwae[100] < iwae[10] < iwae[1], iwae
    assert iwae[10] < elbo["mean"] and iwae[100] < elbo["mean"]
    # S = 1 is the ELBO estimated with sampled instead of analytic KLs: equal in expectation
    assert abs(iwae[1] - elbo["mean"]) < elbo["half_width"], (iwae[1], elbo)


def test_ray_workers_give_the_numbers_of_one_process(trained, uri, data, ray_cluster):
    from pipeline.cluster.evaluation import plan
    from pipeline.registry import evaluation, loading
    reg = loading.load(f"models:/{NAME}@candidate")
    tests = evaluation.test_set(reg, data["digits"])
    assert [p[:2] for p in plan(8, 4, 2)] == [(0, 4), (4, 8)]  # two tasks of one batch each
    one = evaluation.evaluate(reg, tests, iwae_samples=4, batch_size=4)
    two = evaluation.evaluate(reg, tests, iwae_samples=4, batch_size=4, workers=2)
    assert two["workers"] == 2
    for key, values in one["per_episode"].items():
        np.testing.assert_allclose(two["per_episode"][key], values, rtol=1e-5, atol=1e-4, err_msg=key)


def test_generate_and_inspect_write_labelled_figures(trained, uri, data, tmp_path):
    from jobs import generate, inspect
    assert generate.main(["--model", f"models:/{NAME}@champion", "--out", str(tmp_path / "gen"), "--episode",
                          data["digits"], "--index", "1", "--rounds", "2", "--samples", "2"]) == 0
    assert inspect.main(["--model", f"models:/{NAME}@champion", "--random", "--out", str(tmp_path / "ins"),
                         "--grid", "5"]) == 0
    gen = json.loads((tmp_path / "gen" / "generate.json").read_text())
    t = 8
    expected = {"prior": 1 + 2 * 2, "conditional": 3 + 2, "perturbation": 2 + 5, "iterative": 2 + 2}
    for name, rows in expected.items():
        assert (gen[name]["rows"], gen[name]["cols"]) == (rows, t), (name, gen[name])
        assert len(gen[name]["row_labels"]) == rows
    ins = json.loads((tmp_path / "ins" / "inspect.json").read_text())
    assert ins["memory"] == {**ins["memory"], "channels": 8, "images": t, "reads": 1}  # 7 of the code's 32 channels + coverage
    assert (ins["sweep"]["panels"], ins["sweep"]["rows"], ins["sweep"]["cols"]) == (3, 5, 5)
    for fig in [*gen.values(), *ins.values()]:
        pixels = np.asarray(Image.open(fig["path"]).convert("L"), dtype=np.float32)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 10, fig["path"]


def test_champion_moves_only_for_a_better_bound(trained, uri, data, capsys):
    from jobs import promote
    client = MlflowClient(uri)
    v1 = client.get_model_version(NAME, trained.model_version)
    chain = promotion.bound_tag("chain_neg_elbo")  # what the champion rule compares by default
    bound, episodes = float(v1.tags[chain]), v1.tags[promotion.EPISODES_TAG]

    def version(b, fp=episodes):  # the same weights, registered again with a stated bound
        v = client.create_model_version(NAME, v1.source, v1.run_id, model_id=v1.source.split('/')[-1]).version
        for k, val in {chain: f"{b:.6f}", promotion.EPISODES_TAG: fp,
                       promotion.UNIT_TAG: "nats/image", **{k: v1.tags[k] for k in (naming.DATASET, naming.IMAGE_SHAPE,
                       naming.BIT_DEPTH, naming.EPISODE_LENGTH, naming.TEST_EPISODES, naming.EPISODES_MODE,
                       naming.DATA_SEED, naming.EVAL_SEED)}}.items():
            client.set_model_version_tag(NAME, v, k, val)
        return v

    def run(*args):
        assert promote.main(["--model", NAME, *args]) == 0
        # the session's Ray cluster forwards worker log lines to stdout asynchronously: take the JSON line
        return json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])

    worse = version(bound + 5)
    d = run("--version", worse)
    assert not d["promoted"] and d["bound"] == pytest.approx(bound + 5) and d["champion_bound"] == pytest.approx(bound)
    assert client.get_model_version_by_alias(NAME, "champion").version == v1.version
    better = version(bound - 5)
    d = run("--version", better)
    assert d["promoted"] and d["champion_version"] == v1.version
    assert client.get_model_version_by_alias(NAME, "champion").version == better
    assert client.get_model_version(NAME, better).tags["champion.decision"] == "promoted"
    # a lower number measured on other episodes is not compared...
    elsewhere = version(1.0, fp="other-episodes")
    assert not run("--version", elsewhere)["promoted"]
    # ...unless both are recomputed on the same episodes: the same weights give the same bound, so it stays
    d = run("--version", elsewhere, "--data", data["digits"])
    assert not d["promoted"] and d["metric"] == "chain_neg_elbo" and "both recomputed on 8 test episodes" in d["reason"]
    assert d["bound"] == pytest.approx(d["champion_bound"]) == pytest.approx(bound, abs=1e-3)
    assert client.get_model_version_by_alias(NAME, "champion").version == better


def test_bad_input_exits_2_naming_the_mismatch(trained, uri, data, tmp_path):
    from tests.fixtures.mlflow_server import free_port
    model = f"models:/{NAME}@candidate"
    cases = {
        "no such model": (["jobs.evaluate", "--model", f"models:/{PREFIX}-nope@candidate", "--data", data["digits"]],
                          uri, f"no registered model named '{PREFIX}-nope'"),
        "alias not set": (["jobs.evaluate", "--model", f"models:/{NAME}@gold", "--data", data["digits"]], uri,
                          "alias 'gold' is not set on kpp-t-digits (aliases: "),
        "other dataset": (["jobs.evaluate", "--model", model, "--data", data["omniglot"]], uri,
                          "dataset: the model has digits, the data has omniglot"),
        "shape and bit depth": (["jobs.generate", "--model", model, "--out", str(tmp_path), "--episode", data["grey"]],
                                uri, "image shape (CxHxW): the model has 1x28x28, the data has 1x16x16; bit depth: "
                                     "the model has 1, the data has 8"),
        "server down": (["jobs.inspect", "--model", model, "--episode", data["digits"]],
                        f"http://127.0.0.1:{free_port()}", "is unreachable"),
        "no such version": (["jobs.promote", "--model", NAME, "--version", "99"], uri, "kpp-t-digits has no version 99"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=clean_env(u), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, u, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 2, (name, proc.returncode, stderr[-2000:])
        assert cases[name][2] in stderr, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])


@pytest.mark.parametrize("job, args, named", [
    ("generate", ["--index", "-1", "--out", "/nonexistent"], "--index"),
    ("inspect", ["--grid", "1"], "--grid"),
    ("evaluate", ["--data", "/nonexistent", "--episodes", "0"], "--episodes")])
def test_figure_and_evaluate_jobs_refuse_bad_flags_before_importing_torch(job, args, named):
    """A typo on the command line answers at once (exit 2, the flag named), not after the seconds torch's import
    takes: the flag parsing of these jobs imports nothing heavy."""
    code = (f"import sys; from jobs import {job}\n"
            f"try:\n    {job}.main(['--model', 'models:/x@y', *{args!r}])\n"
            "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "EXIT 2 False" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert named in r.stderr
