"""Checks an installed environment against the lock; the image build runs it right after its pip install.

    python check_install.py --constraints constraints.txt --torch 2.13.0+cu128 --cuda
    python check_install.py --constraints constraints.txt --torch 2.13.0+cpu --no-cuda

Fails (exit 1, one line per problem) when an installed distribution that constraints.txt pins has another
version (a local label such as +cu128 aside: the lock pins public versions), when torch is not exactly the wanted
build or not of the wanted kind (CUDA or CPU), when Ray's dashboard (ray[default]) or the AWS node provider of its
autoscaler (boto3) cannot be imported. Uses the standard library only, so it runs before and without the project.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import pathlib
import re
import sys


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: pathlib.Path) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line (comments, blanks and markers ignored)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s,]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def installed() -> dict[str, str]:
    return {_norm(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def problems(pins: dict[str, str], have: dict[str, str], torch_build: str, cuda: bool | None) -> list[str]:
    out = [f"{name} {have[name]} installed, the lock pins {want}"
           for name, want in sorted(pins.items()) if name in have and have[name].split("+", 1)[0] != want]
    if have.get("torch") != torch_build:
        out.append(f"torch {have.get('torch', '(none)')} installed, {torch_build} wanted")
    if have.get("torch", "").split("+", 1)[0] != pins.get("torch"):
        out.append(f"torch {have.get('torch', '(none)')} is not the lock's {pins.get('torch', '(unpinned)')}")
    if cuda is not None and "torch" in have:
        import torch
        if bool(torch.version.cuda) != cuda:
            out.append(f"torch {torch.__version__} is {'a CPU' if cuda else 'a CUDA'} build, "
                       f"{'a CUDA' if cuda else 'a CPU'} build wanted")
    for module in ("ray.dashboard", "aiohttp_cors"):  # ray[default]: the dashboard and its job server
        try:
            importlib.import_module(module)
        except ImportError as e:
            out.append(f"{module} does not import ({e}): ray[default] is not installed")
    # the head's autoscaler loads its node provider from the head's own packages: without boto3 a launcher
    # cluster (infra/launcher/aws.yaml) starts but never adds a node
    for module in ("boto3", "botocore", "ray.autoscaler._private.aws.node_provider"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            out.append(f"{module} does not import ({e}): the autoscaler cannot start AWS nodes (boto3 is a "
                       "dependency of the project)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--constraints", default="constraints.txt", type=pathlib.Path)
    ap.add_argument("--torch", required=True, help="the exact torch build wanted, e.g. 2.13.0+cu128")
    ap.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                    help="torch must be a CUDA build (--cuda) or a CPU build (--no-cuda)")
    args = ap.parse_args(argv)
    found = problems(lock_pins(args.constraints), installed(), args.torch, args.cuda)
    for p in found:
        print(f"check_install: {p}", file=sys.stderr)
    if not found:
        print(f"check_install: the environment matches {args.constraints} (torch {args.torch})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
