"""Step time of the default K++ model in this tree against another checkout of the project (e.g. the commit an issue
was filed against), interleaved in one window, as CPU seconds per step (the stable measure on shared cores).

    git worktree add /tmp/kpp-before 3a71fdb
    python -m research.step_speed_vs_tree --before /tmp/kpp-before --rounds 3 --out outputs/benchmarks/before_after.json

Each measurement is a fresh process that imports `kpp` from one tree, builds that tree's default model with the key
writer, and times forward + backward + clip + Adam on 16 episodes x 16 binarized-MNIST images (the same work for
any tree: only `KanervaPlusPlus(cfg)(x, beta)["loss"]` is used). This tree's VAE (same encoder and decoder) and the
reference prototype (../shared/reference/kpp_ref, its own step) are timed beside them, so one run gives after/before,
the memory's overhead and the ratio to the reference.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

MEASURE = r'''
import json, os, sys, time
repo, threads, steps, writer, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
sys.path.insert(0, repo)
import numpy as np, torch
torch.set_num_threads(threads)
from kpp import KanervaConfig, KanervaPlusPlus
x = torch.from_numpy(np.load(data)["x_train"][:4096]).float().view(-1, 1, 28, 28)
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
def batch():
    return x[torch.randint(0, len(x), (256,), generator=g)].view(16, 16, 1, 28, 28)
if writer == "reference":  # the reference prototype's own step (jobs.benchmark.reference_step)
    from jobs.benchmark import reference_step
    ref = reference_step(16, 16)
    torch.set_num_threads(threads)
    model = None
    def step():
        ref(batch())
else:
    model = KanervaPlusPlus(KanervaConfig.from_dict({"memory": {"writer": writer}}).validate()).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    def step():
        out = model(batch(), beta=0.5)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
for _ in range(3):
    step()
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(steps):
    step()
print(json.dumps({"s_per_step": (time.perf_counter() - t0) / steps, "cpu_s_per_step": (time.process_time() - c0) / steps,
                  "num_reads": model and model.cfg.keys.num_reads,
                  "stem_stride": model and getattr(model.cfg.encoder, "stem_stride", 1),
                  "load": os.getloadavg()[0]}))
'''


def measure(repo: pathlib.Path, writer: str, threads: int, steps: int, data: str) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, str(repo), str(threads), str(steps), writer, data],
                       capture_output=True, text=True, cwd=repo)
    if r.returncode:
        raise SystemExit(f"timing {repo} ({writer}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="another checkout of this project (git worktree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="../shared/data/binarized_mnist/binarized_mnist.npz")
    ap.add_argument("--out", default="outputs/benchmarks/before_after.json")
    args = ap.parse_args(argv)
    before, after = pathlib.Path(args.before).resolve(), pathlib.Path(__file__).resolve().parents[1]
    data = str(pathlib.Path(args.data).resolve())
    for path, what in ((before / "kpp", "--before: no kpp/ in it"), (pathlib.Path(data), "--data: no such file")):
        if not path.exists():
            raise SystemExit(f"{what}: {path}")
    from jobs.benchmark import REFERENCE
    variants = [("before", before, "key"), ("after", after, "key"), ("vae_after", after, "vae")]
    if REFERENCE.exists():
        variants.append(("reference", after, "reference"))
    else:
        print(f"no reference prototype at {REFERENCE}: not timed", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for i in range(args.rounds):  # interleaved: each round times every variant under the same load
        for name, repo, writer in variants:
            runs[name].append(measure(repo, writer, args.threads, args.steps, data))
            print(f"round {i + 1} {name:9s} {runs[name][-1]}", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("s_per_step", "cpu_s_per_step")} for k, v in runs.items()}
    out = {"before": str(before), "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
           "images_per_step": 256, "runs": runs, "median": med,
           "ratios": {"before_over_after_cpu_time": med["before"]["cpu_s_per_step"] / med["after"]["cpu_s_per_step"],
                      "before_over_after_step_time": med["before"]["s_per_step"] / med["after"]["s_per_step"],
                      "kpp_over_vae_cpu_time": med["after"]["cpu_s_per_step"] / med["vae_after"]["cpu_s_per_step"],
                      "kpp_over_vae_step_time": med["after"]["s_per_step"] / med["vae_after"]["s_per_step"]}}
    if "reference" in med:
        out["ratios"].update(
            kpp_over_reference_cpu_time=med["after"]["cpu_s_per_step"] / med["reference"]["cpu_s_per_step"],
            kpp_over_reference_step_time=med["after"]["s_per_step"] / med["reference"]["s_per_step"])
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
