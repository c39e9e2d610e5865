"""The Ray cluster launcher config (infra/launcher/aws.yaml) is one the installed Ray accepts, and its nodes run the
project's images: Python 3.11 and the project installed with CI's lock (pip install -c constraints.txt), ray[default]
with it."""
from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import yaml

from tests.infra_helpers import (DOCKERFILES, REPO, ci_constraints_file, dockerfile_problems, documented_tag,
                                 instructions, project_requirements, shell_commands)

LAUNCHER = REPO / "infra" / "launcher" / "aws.yaml"


def config() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def validate(cfg: dict) -> None:
    """What `ray up` does to the file before anything starts: fill in the provider's defaults, then validate
    against Ray's own ray/autoscaler/ray-schema.json (jsonschema) and check the docker section. Offline."""
    from ray.autoscaler._private.docker import validate_docker_config
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    validate_docker_config(prepared)


def test_launcher_config_validates_against_rays_schema():
    validate(config())


@pytest.mark.parametrize("path,value", [
    (("bogus_top_level_key",), 1),
    (("docker", "imagee"), "x"),
    (("available_node_types", "gpu_worker", "min_worker"), 0),
    (("available_node_types", "gpu_worker", "resources", "GPU"), "1"),
    (("provider",), None),
])
def test_rays_schema_rejects_a_broken_config(path, value):
    cfg = config()
    node = cfg
    for p in path[:-1]:
        node = node[p]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)):
        validate(cfg)


def test_nodes_run_the_project_images_which_install_from_the_lock():
    """Every setup and start command runs inside the docker images; those are infra/docker's, by their documented
    tags, and those Dockerfiles install with CI's constraints file (checked in full by test_infra_docker)."""
    cfg = config()
    docker = cfg["docker"]
    tags = {kind: documented_tag(p.read_text()) for kind, p in DOCKERFILES.items()}
    assert docker["head_image"] == tags["cpu"] and docker["worker_image"] == tags["gpu"]
    assert "image" not in docker or docker["image"] in tags.values()
    for kind, path in DOCKERFILES.items():
        assert dockerfile_problems(path.read_text(), {"gpu": "cuda", "cpu": "cpu"}[kind]) == [], path
        pips = [c for k, rest in instructions(path.read_text()) if k == "RUN" for c in shell_commands(rest)
                if "pip" in c and "install" in c]
        assert pips and all(c[c.index("-c") + 1] == ci_constraints_file() for c in pips), pips
    # ray[default] through the project's dependencies: the dashboard the job submissions go to
    assert "default" in project_requirements()["ray"].extras


def test_setup_installs_nothing_outside_the_lock_and_checks_the_image():
    cfg = config()
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands") for c in cfg.get(key, [])]
    for node in cfg["available_node_types"].values():
        commands += node.get("worker_setup_commands", []) + node.get("initialization_commands", [])
    for command in commands:
        for words in shell_commands(command):
            if "pip" in words and "install" in words:  # any install on a node must use the lock too
                assert words[words.index("-c") + 1].endswith(ci_constraints_file()), command
    head, worker = cfg["head_setup_commands"], cfg["worker_setup_commands"]
    torch = project_requirements()["torch"].specifier
    for cmds, flag in ((head, "--no-cuda"), (worker, "--cuda")):
        (check,) = [c for c in cmds if "check_install.py" in c]
        words = check.split()
        assert words[words.index("--constraints") + 1] == "/app/" + ci_constraints_file()
        assert torch.contains(words[words.index("--torch") + 1]) and flag in words
    build = {k: re.search(r"^ARG TORCH_BUILD=(\S+)$", p.read_text(), re.M).group(1) for k, p in DOCKERFILES.items()}
    assert f"--torch {build['cpu']} " in head[0] + " " and f"--torch {build['gpu']} " in worker[0] + " "


def test_gpu_worker_type_and_head():
    cfg = config()
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert workers and all(w["resources"].get("GPU", 0) >= 1 for w in workers)
    assert all(0 <= w["min_workers"] <= w["max_workers"] <= cfg["max_workers"] for w in workers)
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def test_launcher_env_carries_the_train_settings_and_no_credentials():
    from pipeline.cluster.driver import RAY_ENV
    env = dict(opt.split(None, 1)[1].split("=", 1) for opt in config()["docker"]["run_options"]
               if opt.startswith("--env "))
    assert env.items() >= RAY_ENV.items()
    assert "MLFLOW_TRACKING_URI" in env
    assert not any(k.startswith("AWS_SECRET") or k == "AWS_ACCESS_KEY_ID" for k in env)


def test_the_old_paths_are_gone():
    assert not (REPO / "infra" / "cluster-aws.yaml").exists()
    assert not (REPO / "infra" / "kuberay-rayjob.yaml").exists()


def test_the_head_image_holds_what_the_aws_autoscaler_imports(tmp_path):
    """The head's autoscaler loads Ray's AWS node provider from the head image's packages, which are the project's
    dependencies (the images install `-e .` with the lock): boto3 is one of them, the provider imports here, and
    the image's check (head_setup_commands and the image build) fails, naming it, where boto3 is missing."""
    import subprocess
    import sys
    assert "boto3" in project_requirements()
    import ray.autoscaler._private.aws.node_provider  # noqa: F401 - the provider's own imports (boto3, botocore)
    script = str(REPO / "infra" / "docker" / "check_install.py")
    (tmp_path / "boto3.py").write_text("raise ImportError('No module named boto3')\n")  # an image without boto3
    import torch
    kind = "--cuda" if torch.version.cuda else "--no-cuda"
    args = [sys.executable, script, "--constraints", str(REPO / "constraints.txt"), "--torch", torch.__version__, kind]
    assert subprocess.run(args, capture_output=True, text=True, timeout=120).returncode == 0
    bad = subprocess.run(args, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(tmp_path)})
    assert bad.returncode == 1 and "boto3 does not import" in bad.stderr and "AWS nodes" in bad.stderr, bad.stderr
    head = config()["head_setup_commands"]
    assert any("check_install.py" in c for c in head)
