"""The images of infra/docker/ (GPU: Dockerfile, CPU: Dockerfile.cpu) install exactly what CI tests, as a non-root
user, with no credentials. Docker is not needed: the Dockerfiles are read and checked (tests/infra_helpers.py), and
each check is shown to fail on a Dockerfile that breaks its rule. check_install.py, which the image build runs
after its pip install, runs here against this environment."""
from __future__ import annotations

import fnmatch
import importlib.util
import re
import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet

from tests.infra_helpers import (DOCKERFILES, REPO, ci_constraints_file, dockerfile_problems, documented_tag,
                                 instructions, lock_pins, project_requirements, pyproject)

KIND = {"gpu": "cuda", "cpu": "cpu"}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_follows_the_rules(image):
    assert dockerfile_problems(DOCKERFILES[image].read_text(), KIND[image]) == []


def test_ci_installs_from_the_same_lock_the_images_use():
    assert ci_constraints_file() == "constraints.txt"
    for path in DOCKERFILES.values():
        assert "pip install -c constraints.txt" in path.read_text()


def test_torch_pins_agree_and_a_local_build_satisfies_them():
    """pyproject and the lock pin the same torch, and PEP 440 lets `==2.13.0` match the +cu128/+cpu builds
    (a specifier without a local label ignores the candidate's), which is what the images install."""
    lock, pinned = lock_pins()["torch"], project_requirements()["torch"].specifier
    assert pinned == SpecifierSet(f"=={lock}")
    assert SpecifierSet("==2.13.0").contains("2.13.0+cu128") and SpecifierSet("==2.13.0").contains("2.13.0+cpu")
    assert not SpecifierSet("==2.13.0").contains("2.13.1+cu128")
    for image, path in DOCKERFILES.items():
        (build,) = re.findall(r"^ARG TORCH_BUILD=(\S+)$", path.read_text(), re.M)
        assert build.split("+")[0] == lock and pinned.contains(build), (image, build)


def test_ray_default_comes_with_the_project():
    """ray[default] (dashboard, Jobs API server, autoscaler deps) is a dependency of the project at the lock's
    version, and the images install the project with its dependencies."""
    ray = project_requirements()["ray"]
    assert "default" in ray.extras
    assert ray.specifier == SpecifierSet(f"=={lock_pins()['ray']}")
    assert "aiohttp-cors" in lock_pins()  # one of ray[default]'s own dependencies: the lock was made with it


def test_the_two_images_differ_only_in_the_torch_build():
    def skeleton(path):
        return [(k, rest) for k, rest in instructions(path.read_text())
                if not (k == "ARG" and rest.startswith("TORCH_")) and "check_install.py --" not in rest]
    assert skeleton(DOCKERFILES["gpu"]) == skeleton(DOCKERFILES["cpu"])
    version = pyproject()["project"]["version"]
    assert documented_tag(DOCKERFILES["gpu"].read_text()) == f"ghcr.io/your-org/kanerva-pp:{version}-cu128"
    assert documented_tag(DOCKERFILES["cpu"].read_text()) == f"ghcr.io/your-org/kanerva-pp:{version}-cpu"


# Each rule, broken once: the check must catch it.
MUTATIONS = [
    ("no constraints", lambda s: s.replace("pip install -c constraints.txt ", "pip install "), "-c constraints.txt"),
    ("another constraints file", lambda s: s.replace("-c constraints.txt --extra", "-c other.txt --extra"),
     "-c constraints.txt"),
    ("an extra unconstrained install", lambda s: s.replace("RUN pip install", "RUN pip install numpy && pip install"),
     "pip install numpy"),
    ("no deps", lambda s: s.replace("-e .", "--no-deps -e ."), "--no-deps"),
    ("project not installed", lambda s: s.replace(" -e . ", " torch "), "is not installed"),
    ("torch build of another version", lambda s: re.sub(r"TORCH_BUILD=2\.13\.0", "TORCH_BUILD=2.12.0", s),
     "TORCH_BUILD 2.12.0"),
    ("torch build of another index", lambda s: re.sub(r"TORCH_BUILD=2\.13\.0\+\w+", "TORCH_BUILD=2.13.0+rocm6.4", s),
     "local label"),
    ("explicit torch pin that is not the lock's", lambda s: s.replace("-e . ", "-e . torch==2.12.0 "),
     "torch==2.12.0"),
    ("install not checked", lambda s: re.sub(r" \\\n && python /opt/kpp/check_install.py[^\n]*", "", s),
     "not checked"),
    ("latest base", lambda s: re.sub(r"^FROM \S+", "FROM python:latest", s, flags=re.M), "not pinned"),
    ("untagged base", lambda s: re.sub(r"^FROM \S+", "FROM python", s, flags=re.M), "no tag"),
    ("base without the patch version", lambda s: re.sub(r"^FROM \S+", "FROM python:3.11-slim", s, flags=re.M),
     "patch version"),
    ("base of an unsupported Python", lambda s: re.sub(r"^FROM \S+", "FROM python:3.10.18-slim", s, flags=re.M),
     "requires-python"),
    ("no USER", lambda s: s.replace("USER 1000:1000\n", ""), "no USER"),
    ("root USER", lambda s: s.replace("USER 1000:1000", "USER root"), "runs as root"),
    ("uid 0", lambda s: s.replace("USER 1000:1000", "USER 0:0"), "runs as root"),
    ("named USER", lambda s: s.replace("USER 1000:1000", "USER kpp"), "numeric"),
    ("USER after CMD", lambda s: s.replace("USER 1000:1000\n", "") + "USER 1000\n", "after CMD"),
    ("no CMD", lambda s: re.sub(r"^CMD .*$", "", s, flags=re.M), "no CMD"),
    ("no WORKDIR", lambda s: s.replace("WORKDIR /app\n", ""), "no WORKDIR"),
    ("project copied elsewhere", lambda s: s.replace("README.md ./", "README.md /src/"), "not copied into the WORKDIR"),
    ("credential ENV", lambda s: s.replace("ENV PYTHONUNBUFFERED=1", "ENV AWS_SECRET_ACCESS_KEY=x PYTHONUNBUFFERED=1"),
     "AWS_SECRET_ACCESS_KEY"),
    ("credential ARG", lambda s: s.replace("ARG TORCH_INDEX_URL", "ARG HF_TOKEN\nARG TORCH_INDEX_URL"), "HF_TOKEN"),
    ("index URL with a password", lambda s: re.sub(r"https://download", "https://me:hunter2@download", s),
     "holds a credential"),
    ("tag of another version", lambda s: s.replace("kanerva-pp:0.1.0-", "kanerva-pp:0.2.0-"), "documented tag"),
    ("latest tag", lambda s: re.sub(r"kanerva-pp:\S+ \.", "kanerva-pp:latest .", s), "documented tag"),
]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
@pytest.mark.parametrize("what,mutate,expect", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_check_fails_when_its_rule_is_broken(image, what, mutate, expect):
    original = DOCKERFILES[image].read_text()
    broken = mutate(original)
    assert broken != original, f"the mutation '{what}' did not change {DOCKERFILES[image].name}"
    found = dockerfile_problems(broken, KIND[image])
    assert any(expect in p for p in found), (what, found)


def test_the_gpu_image_rejects_a_cpu_torch_build_and_the_cpu_image_a_cuda_one():
    gpu, cpu = DOCKERFILES["gpu"].read_text(), DOCKERFILES["cpu"].read_text()
    assert any("local label" in p or "index" in p for p in dockerfile_problems(cpu, "cuda"))
    assert any("local label" in p or "index" in p for p in dockerfile_problems(gpu, "cpu"))


# -- .dockerignore: what reaches the build context -----------------------------------------------------------------
def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path or one of its parent directories wins;
    `!` re-includes; `**/` matches any depth, none included."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.rstrip("/")
        alts = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(p, a) for p in prefixes for a in alts):
            ignored = not neg
    return ignored


def test_dockerignore_admits_only_what_the_images_copy():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    for path in (".venv/bin/python", ".git/config", "outputs/ray/x", "mlruns/0/meta.yaml", ".pytest_cache/v",
                 "kpp/__pycache__/model.cpython-311.pyc", "kanerva_pp.egg-info/PKG-INFO", ".env",
                 "infra/kuberay/secret.example.yaml", "tests/conftest.py", "../shared/data"):
        assert _ignored(path, patterns), f"{path} would be sent to the image build"
    copied = set()
    for path in DOCKERFILES.values():
        for k, rest in instructions(path.read_text()):
            if k == "COPY":
                copied.update(rest.split()[:-1])
    assert copied >= {"pyproject.toml", "constraints.txt", "kpp", "pipeline", "jobs"}
    for src in copied | {"kpp/model.py", "jobs/configs/mnist_gpu.yaml", "pipeline/cluster/driver.py"}:
        assert not _ignored(src, patterns), f"{src} is COPYed but left out of the build context"
        assert (REPO / src).exists() or src.endswith(".py"), src


def test_dockerignore_rule_is_not_vacuous():
    assert _ignored(".venv/x", ["*"]) and not _ignored("kpp/x.py", ["*", "!kpp/"])
    assert _ignored("kpp/__pycache__/x.pyc", ["*", "!kpp/", "**/__pycache__"])
    assert not _ignored(".venv/x", ["outputs"])


# -- check_install.py: the build's own check of the installed environment ------------------------------------------
def _check_install():
    spec = importlib.util.spec_from_file_location("check_install", REPO / "infra" / "docker" / "check_install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_install_passes_here_and_fails_on_the_wrong_torch_build():
    import torch
    script = str(REPO / "infra" / "docker" / "check_install.py")
    lock = str(REPO / "constraints.txt")
    kind = "--cuda" if torch.version.cuda else "--no-cuda"
    ok = subprocess.run([sys.executable, script, "--constraints", lock, "--torch", torch.__version__, kind],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    wrong = "2.13.0+rocm6.4" if "+" in torch.__version__ else torch.__version__ + "+cu128"
    bad = subprocess.run([sys.executable, script, "--constraints", lock, "--torch", wrong,
                          "--no-cuda" if kind == "--cuda" else "--cuda"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and f"{wrong} wanted" in bad.stderr and "build wanted" in bad.stderr, bad.stderr


def test_check_install_reports_a_version_off_the_lock(tmp_path):
    mod = _check_install()
    lock = tmp_path / "constraints.txt"
    lock.write_text("# comment\nNumPy==2.4.6\nray[default]==2.60.0\ntorch==2.13.0\nunused==1.0\n")
    pins = mod.lock_pins(lock)
    assert pins == {"numpy": "2.4.6", "ray": "2.60.0", "torch": "2.13.0", "unused": "1.0"}
    have = {"numpy": "2.4.5", "ray": "2.60.0", "torch": "2.13.0+cu128"}
    found = mod.problems(pins, have, "2.13.0+cu128", None)
    assert any(p.startswith("numpy 2.4.5 installed") for p in found)
    assert not any(p.startswith(("ray ", "torch ", "unused ")) for p in found), found
    assert any("torch 2.13.0+cpu installed" in p for p in mod.problems(pins, {**have, "torch": "2.13.0+cpu"},
                                                                           "2.13.0+cu128", None))
