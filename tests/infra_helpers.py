"""What the infra tests share: the project's pins (pyproject.toml, constraints.txt, the Makefile's install line) and a
small Dockerfile reader with the checks every image of infra/docker/ must pass (`dockerfile_problems`)."""
from __future__ import annotations

import functools
import pathlib
import re
import shlex
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "infra" / "docker" / "Dockerfile", "cpu": REPO / "infra" / "docker" / "Dockerfile.cpu"}
# Names that hold a credential when they name an ENV or ARG (or a config key): never baked into an image.
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY|AUTH", re.I)


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["project"]["dependencies"])}


def ci_constraints_file() -> str:
    """The constraints file of CI's install: the `pip install ... -c <file>` line of the Makefile's venv recipe."""
    for line in (REPO / "Makefile").read_text().splitlines():
        if "pip install" in line and "-c" in line.split():
            words = line.split()
            return words[words.index("-c") + 1]
    raise AssertionError("the Makefile has no `pip install -c <constraints>` line")


def lock_pins() -> dict[str, str]:
    """{canonical name: version} of constraints.txt."""
    pins = {}
    for line in (REPO / ci_constraints_file()).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[", 1)[0])] = version.strip()
    return pins


# -- Dockerfiles ---------------------------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuation lines joined; comments and the parser directive dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not buf):  # a comment line inside a continuation is skipped too
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _args_of(kind: str, text: str) -> dict[str, str]:
    """ENV/ARG name -> value (ARG without a default -> '')."""
    found = {}
    for ins, rest in instructions(text):
        if ins != kind:
            continue
        words = shlex.split(rest)
        if kind == "ENV" and len(words) >= 2 and "=" not in words[0]:  # legacy `ENV NAME value`
            found[words[0]] = " ".join(words[1:])
            continue
        for w in words:
            name, _, value = w.partition("=")
            found[name] = value
    return found


def documented_tag(text: str) -> str | None:
    """The image tag of the Dockerfile's documented `docker build ... -t <tag> .` line."""
    m = re.search(r"docker build .*?-t (\S+) \.", text)
    return m.group(1) if m else None


def shell_commands(run: str) -> list[list[str]]:
    """The commands of one RUN, split at && ; || and |, each as its words."""
    return [shlex.split(c) for c in re.split(r"&&|\|\||;|\|", run) if c.strip()]


def _substitute(words: list[str], args: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), w) for w in words]


def _constraint_files(pip: list[str]) -> list[str]:
    files = []
    for i, w in enumerate(pip):
        if w in ("-c", "--constraint") and i + 1 < len(pip):
            files.append(pip[i + 1])
        elif w.startswith("--constraint="):
            files.append(w.split("=", 1)[1])
        elif w.startswith("-c") and len(w) > 2:
            files.append(w[2:])
    return files


def _installs_project(pip: list[str]) -> bool:
    return any(w == "." or w.startswith(".[") or w.startswith("./") for w in pip)


def dockerfile_problems(text: str, torch_kind: str) -> list[str]:
    """Every way the Dockerfile text breaks the rules of this project's images (empty: none). torch_kind is 'cuda'
    or 'cpu'. Checked: pinned base image of the project's Python; every pip install with CI's constraints file,
    copied in first, and the project installed with its dependencies (ray[default] among them); the torch build
    it must end with equal to the lock's torch with the index's local label; WORKDIR at the project root; a
    non-root USER before CMD/ENTRYPOINT; no credential in ENV or ARG; the documented tag of the project's version
    and torch build."""
    problems: list[str] = []
    ins = instructions(text)
    kinds = [k for k, _ in ins]
    args = {**_args_of("ARG", text), **_args_of("ENV", text)}
    lock, version = lock_pins(), pyproject()["project"]["version"]
    constraints = ci_constraints_file()

    # base image: pinned by tag (or digest), never latest, a Python the project supports
    froms = [rest.split()[-1] if " AS " not in rest.upper() else rest.split()[-3] for k, rest in ins if k == "FROM"]
    if not froms:
        problems.append("no FROM")
    for image in froms:
        name, _, tag = image.rpartition("@")[0].rpartition(":") if "@" in image else image.rpartition(":")
        if "@sha256:" in image:
            continue
        if not name or "/" in tag:
            problems.append(f"base image {image} has no tag: pin it")
        elif tag == "latest" or not re.search(r"\d", tag):
            problems.append(f"base image {image} is not pinned (tag {tag!r})")
        elif name.endswith("python"):
            m = re.match(r"(\d+\.\d+\.\d+)-", tag + "-")
            if not m:
                problems.append(f"base image {image}: pin the Python patch version (e.g. 3.11.13-slim-bookworm)")
            elif not SpecifierSet(pyproject()["project"]["requires-python"]).contains(m.group(1)):
                problems.append(f"base image {image}: Python {m.group(1)} outside requires-python")

    # WORKDIR: the project root, set before the project's files are copied
    workdirs = [i for i, k in enumerate(kinds) if k == "WORKDIR"]
    copy_pyproject = [i for i, (k, rest) in enumerate(ins) if k == "COPY" and "pyproject.toml" in rest.split()]
    if not workdirs:
        problems.append("no WORKDIR")
    elif not ins[workdirs[-1]][1].startswith("/"):
        problems.append(f"WORKDIR {ins[workdirs[-1]][1]} is not absolute")
    if not copy_pyproject:
        problems.append("pyproject.toml is not copied in")
    elif not workdirs or workdirs[0] > copy_pyproject[0] or ins[copy_pyproject[0]][1].split()[-1] not in (
            "./", ".", ins[workdirs[-1]][1], ins[workdirs[-1]][1] + "/"):
        problems.append("pyproject.toml is not copied into the WORKDIR: the image's WORKDIR must be the project root")

    # pip: every install with CI's constraints, copied in before; the project with its dependencies
    copied = [(i, rest.split()[:-1]) for i, (k, rest) in enumerate(ins) if k == "COPY"]
    project_installed = False
    for i, (k, rest) in enumerate(ins):
        if k != "RUN":
            continue
        for cmd in shell_commands(rest):
            if "pip" not in cmd or "install" not in cmd:
                continue
            cmd = _substitute(cmd, args)
            files = _constraint_files(cmd)
            if constraints not in files:
                problems.append(f"`{' '.join(cmd)}` does not install with -c {constraints} (CI's lock)")
            elif not any(constraints in srcs and j < i for j, srcs in copied):
                problems.append(f"{constraints} is not copied in before `{' '.join(cmd)}`")
            if _installs_project(cmd):
                project_installed = True
                if "--no-deps" in cmd:
                    problems.append("the project is installed with --no-deps: ray[default] and the lock's "
                                    "dependencies would be missing")
            for w in cmd:
                if w.startswith("torch==") and w.split("==", 1)[1].split("+")[0] != lock.get("torch"):
                    problems.append(f"{w} is not the lock's torch=={lock.get('torch')}")
    if not project_installed:
        problems.append("the project (pip install -c ... -e .) is not installed")

    # torch: the build the install must end with = the lock's torch + the index's local label
    build, index = args.get("TORCH_BUILD", ""), args.get("TORCH_INDEX_URL", "")
    label = index.rstrip("/").rsplit("/", 1)[-1]
    want_label = {"cuda": r"cu\d+", "cpu": "cpu"}[torch_kind]
    pinned = project_requirements()["torch"].specifier
    if not build:
        problems.append("no ARG TORCH_BUILD (the exact torch build the image must end with)")
    else:
        public, _, local = build.partition("+")
        if public != lock.get("torch") or SpecifierSet(f"=={lock.get('torch')}") != pinned:
            problems.append(f"TORCH_BUILD {build}: not the torch of pyproject ({pinned}) and the lock "
                            f"(=={lock.get('torch')})")
        if not pinned.contains(Version(build)):
            problems.append(f"TORCH_BUILD {build} does not satisfy pyproject's torch{pinned}")
        if not re.fullmatch(want_label, local) or local != label:
            problems.append(f"TORCH_BUILD {build}: local label {local!r} is not the {torch_kind} index's ({label!r})")
    if not re.fullmatch(r"https://download\.pytorch\.org/whl/" + want_label, index):
        problems.append(f"TORCH_INDEX_URL {index!r} is not PyTorch's {torch_kind} wheel index")
    checked = [rest for k, rest in ins if k == "RUN" and "check_install.py" in rest]
    flag = {"cuda": "--cuda", "cpu": "--no-cuda"}[torch_kind]
    if not any("${TORCH_BUILD}" in r and flag in r.split() and f"--constraints {constraints}" in r for r in checked):
        problems.append(f"the install is not checked (check_install.py --constraints {constraints} "
                        f"--torch ${{TORCH_BUILD}} {flag})")

    # USER: non-root, in force when CMD/ENTRYPOINT runs
    runs = [i for i, k in enumerate(kinds) if k in ("CMD", "ENTRYPOINT")]
    users = [(i, rest.split(":")[0]) for i, (k, rest) in enumerate(ins) if k == "USER"]
    if not runs:
        problems.append("no CMD or ENTRYPOINT")
    if not users:
        problems.append("no USER: the image would run as root")
    else:
        i, user = users[-1]
        if user in ("root", "0"):
            problems.append(f"USER {user}: the image runs as root")
        elif not user.isdigit():
            problems.append(f"USER {user}: use a numeric uid (Kubernetes' runAsNonRoot cannot verify a name)")
        if runs and i > runs[-1]:
            problems.append("USER comes after CMD/ENTRYPOINT")

    # credentials: no ENV or ARG that names or holds one
    for kind in ("ENV", "ARG"):
        for name, value in _args_of(kind, text).items():
            if CREDENTIAL_NAME.search(name):
                problems.append(f"{kind} {name}: credentials never go into an image")
            if re.search(r"(AKIA|ASIA)[A-Z0-9]{16}", value) or re.search(r"://[^/\s:@]+:[^/\s@]+@", value):
                problems.append(f"{kind} {name} holds a credential")

    # the documented tag: <registry>/kanerva-pp:<project version>-<torch label>
    tag = documented_tag(text)
    if not tag:
        problems.append("no documented `docker build ... -t <tag> .` line")
    elif tag.rpartition(":")[2] != f"{version}-{label}":
        problems.append(f"documented tag {tag}: want <registry>/kanerva-pp:{version}-{label}")
    return problems
