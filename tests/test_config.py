"""The run config: YAML + overrides, typed coercion, validation that names the field, complete help."""
import dataclasses
import json
import pathlib
import typing

import pydantic
import pytest

from pipeline.train import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
SWEEPS = [p for p in ALL_CONFIGS if p.name.startswith("tune_")]  # sweep configs (jobs.tune), not training configs
CONFIGS = [p for p in ALL_CONFIGS if p not in SWEEPS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = C.load(path)
    assert cfg.name and cfg.train.max_steps >= 1


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    from pipeline.tune import space
    sweep = space.load(str(path), [], root=ROOT)
    assert sweep.cfg.num_trials >= 1 and sweep.domains and sweep.base.train.max_steps > sweep.cfg.asha.grace_steps


def test_overrides_are_typed_and_nested(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: a\ntrain: {lr: 0.1, max_steps: 50}\n")
    cfg = C.load(y, ["train.lr=3e-4", "scaling.num_workers=3", "tracking.enabled=false", "name=b",
                     "model.latent.dim=8"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as str
    assert cfg.train.max_steps == 50 and cfg.scaling.num_workers == 3
    assert cfg.tracking.enabled is False and cfg.name == "b"
    assert cfg.model.latent.dim == 8 and cfg.model.latent.prior_width == 64  # kpp's typed config, kpp's defaults
    assert cfg.model_set == {"latent": {"dim": 8}}  # what the config set, for fields the data may decide


def test_round_trip_and_hash():
    cfg = C.load(None, ["train.lr=0.01"])
    again = C.JobConfig.from_dict(cfg.to_dict()).validate()
    assert again == cfg and again.hash() == cfg.hash()
    assert C.load(None, ["train.lr=0.02"]).hash() != cfg.hash()
    assert cfg.flat()["train.lr"] == 0.01


@pytest.mark.parametrize("override, field", [
    ("train.lrr=1", "train.lrr"),                  # unknown field
    ("bogus.x=1", "bogus"),                        # unknown section
    ("train.max_steps=ten", "train.max_steps"),    # wrong type
    ("train.max_steps=2.5", "train.max_steps"),    # float for an int
    ("scaling.use_gpu=yes please", "scaling.use_gpu"),
    ("train.lr=0", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.optimizer=lion", "train.optimizer"),
    ("train.warmup_steps=500", "train.warmup_steps"),  # >= max_steps
    ("train.halt_at_step=1000", "train.halt_at_step"),
    ("train.precision=bf16", "train.precision"),    # bf16 without a GPU
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.s3_endpoint_url=127.0.0.1:9000", "checkpoint.s3_endpoint_url"),
    ("data.batch_episodes=-1", "data.batch_episodes"),
    ("name=a/b", "name"),
    ("model.read.window=64", "model.read.window"),  # kpp's own validation, path made absolute
    ("model.latent.nope=1", "model.latent"),
    ("train=3", "train"),
    ("data.dataset=nosuch", "data.dataset"),
    ("tracking.uri=htp:/bad", "tracking.uri"),
    ("tracking.uri=http://", "tracking.uri"),
    ("model.read.window=true", "model.read.window"),
    ("eval.every_steps=-1", "eval.every_steps"),
    ("model.memory.writer=kanerva", "model.memory.writer"),  # a writer that does not exist
    ("model.memory.address_dim=8", "model.memory.address_dim"),  # a KM setting on the default K++ writer
])
def test_invalid_config_names_the_field(override, field):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override])
    assert str(e.value).startswith(field), str(e.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(None, ["train.lr"])
    with pytest.raises(C.ConfigError, match="no such file"):
        C.load(tmp_path / "absent.yaml")


def test_every_override_parser_is_the_one_parser(tmp_path):
    """Sweeps and the research script read overrides with pipeline.train.config's parser: the same typing and the
    same refusal of a malformed one."""
    import subprocess
    import sys

    from research.memory_experiment import job_overrides
    from pipeline.train.local import local_job
    from pipeline.tune import space
    job = local_job(job_overrides(["model.keys.num_reads=4", "train.lr=1e-3", "train.steps=40",
                                   "train.lr_min_ratio=0.0", "train.warmup_steps=10", "model.memory.writer=none"]))
    assert (job.model.keys.num_reads, job.model.memory.writer, job.train.lr, job.train.max_steps,
            job.train.min_lr_ratio, job.train.optimizer) == (4, "none", 1e-3, 40, 0.0, "adam")
    with pytest.raises(C.ConfigError, match="model.keys.num_reads"):
        local_job(job_overrides(["model.keys.num_reads=many"]))
    with pytest.raises(C.ConfigError, match="key=value"):
        space.load(str(ROOT / "jobs/configs/tune_cpu.yaml"), ["num_trials"], root=ROOT)
    r = subprocess.run([sys.executable, "-m", "research.memory_experiment", "--name", "x", "bogus=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "override 'bogus=1': expected model.<field>=value" in r.stderr, r.stderr[-2000:]


def _leaf_paths(cls, prefix=""):
    """(dotted path, help text) of every leaf field: the job's pydantic sections, then kpp's dataclasses."""
    from kpp.config import KanervaConfig
    if isinstance(cls, type) and issubclass(cls, pydantic.BaseModel):
        for name, info in cls.model_fields.items():
            tp = info.annotation
            if (isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)) or tp is KanervaConfig:
                yield from _leaf_paths(tp, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", info.description
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata.get("help")


def test_help_documents_every_field():
    text = C.describe()
    lines = {ln.split(" (")[0].strip(): ln for ln in text.splitlines() if ln.startswith("  ")}
    paths = list(_leaf_paths(C.JobConfig))
    assert any(p.startswith("model.") for p, _ in paths)  # the model section is documented from kpp's own config
    for path, help_text in paths:
        assert help_text, f"{path} has no help text (pipeline/train/config.py or kpp/config.py: _f(default, help))"
        assert path in lines and help_text in lines[path], path


def test_cli_help_lists_every_field(capsys):
    from jobs.train import parse
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for path, _ in _leaf_paths(C.JobConfig):
        assert f"  {path} (" in out, path


# The CLI surface, frozen (torchtitan's test_no_new_cli_options): adding, renaming or removing a field is a
# deliberate change to the job's interface, made here too, and old configs/commands must be considered.
FROZEN_FIELDS = """
name seed
data.dataset data.source data.shards data.episodes data.batch_episodes data.valid_episodes data.test_episodes data.loader_workers data.audit_dir
train.max_steps train.halt_at_step train.optimizer train.lr train.weight_decay train.warmup_steps train.schedule
train.min_lr_ratio train.grad_clip train.precision train.nonfinite train.max_nonfinite train.log_every train.gc_every
scaling.num_workers scaling.use_gpu scaling.gpus_per_worker scaling.pin_training_thread scaling.training_cores scaling.cpus_per_worker scaling.timeout_s scaling.resource_wait_s
scaling.placement_strategy scaling.placement_wait_s scaling.autoscaling
checkpoint.storage_path checkpoint.s3_endpoint_url checkpoint.every_steps checkpoint.keep checkpoint.keep_by
checkpoint.max_failures checkpoint.when_behind
tracking.enabled tracking.uri tracking.experiment tracking.registered_model tracking.champion_metric tracking.alias
tracking.images_every_steps
eval.every_steps eval.iwae_samples eval.seed
""".split()


def test_cli_surface_is_frozen():
    paths = [p for p, _ in _leaf_paths(C.JobConfig)]
    assert [p for p in paths if not p.startswith("model.")] == FROZEN_FIELDS


BAD_INPUTS = [  # (arguments of jobs.train, the field its message must start with)
    (["--config", "{bad_yaml}"], "--config: {bad_yaml}: line 3"),
    (["data.dataset=nosuch"], "data.dataset"),
    (["tracking.uri=htp:/bad"], "tracking.uri"),
    (["model.read.window=true"], "model.read.window"),
    (["scaling.autoscaling=maybe"], "scaling.autoscaling: must be 'auto' or a valid boolean"),
    (["model.objective.key_free_bits=oops"], "model.objective.key_free_bits"),
    (["checkpoint.storage_path=s3://nobucket/x", "checkpoint.s3_endpoint_url=http://127.0.0.1:9"],
     "checkpoint.storage_path"),
    (["name=.."], "name: must be one path component"),  # the run folder would be storage_path's parent
    (["name=a/b"], "name: must be one path component"),
    (["seed=-1"], "seed: must be >= 0"),
    (["train.gc_every=-5"], "train.gc_every: must be >= 0"),
    (["scaling.placement_strategy=spread"], "scaling.placement_strategy"),
    (["tracking.alias=champion"], "tracking.alias: 'champion' moves only through the promotion gate"),
    # a champion rule on a number no run records (or one that is no bound) could never compare two versions
    (["tracking.champion_metric=swap_gap"], "tracking.champion_metric: must be a test bound a run reports: one of "
                                            "chain_neg_elbo, chain_iwae, loo_neg_elbo, loo_iwae, neg_elbo, iwae"),
    (["scaling.placement_wait_s=0"], "scaling.placement_wait_s: must be >= 1"),
    (["data.audit_dir=s3://bucket/audit"], "data.audit_dir: must be a path of a file system every node mounts"),
    (["scaling.gpus_per_worker=0.5"], "scaling.gpus_per_worker: is set but scaling.use_gpu=false"),
    (["scaling.pin_training_thread=true", "scaling.cpus_per_worker=0.5"],
     "scaling.pin_training_thread: needs a whole scaling.cpus_per_worker"),
    (["scaling.pin_training_thread=true", "scaling.training_cores=12-a"], "scaling.training_cores: '12-a'"),
]


def test_every_bad_input_exits_2_naming_the_field_before_ray_starts(tmp_path):
    """Through the real CLI, in a fresh process: exit code 2, the field first, and Ray never imported."""
    import subprocess
    import sys
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\ntrain: {max_steps: 3\n")
    script = (
        "import json, sys\n"
        "from jobs import train\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    import contextlib, io\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = train.main(argv)\n"
        "    out.append([rc, err.getvalue(), 'ray' in sys.modules])\n"
        "print(json.dumps(out))\n")
    cases = [([a.format(bad_yaml=bad_yaml) for a in argv], field.format(bad_yaml=bad_yaml)) for argv, field in BAD_INPUTS]
    done = subprocess.run([sys.executable, "-c", script, json.dumps([argv for argv, _ in cases])], capture_output=True,
                          text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    for (argv, field), (rc, err, ray_imported) in zip(cases, json.loads(done.stdout.splitlines()[-1])):
        message = err.split(": ", 1)[1].removeprefix("invalid config: ")
        assert rc == 2 and message.startswith(field), (argv, err)
        assert not ray_imported, argv  # nothing was started
