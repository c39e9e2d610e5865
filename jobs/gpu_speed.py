"""Device check (not a test): training steps/s of K++, DKM w/ TSM and the VAE on one GPU at the paper's episode
shape, fp32 and bf16 autocast, eager and torch.compile, and the expected wall clock of jobs/configs/paper_mnist.yaml
per GPU. Needs only torch (kpp is pure PyTorch), so it runs on a bare GPU box:

    python -m jobs.gpu_speed [--out outputs/benchmarks/gpu_speed.json] [--steps 30]

Images are random binary 28x28 (speed depends on shapes, not on pixel values). jobs.benchmark --profile gpu adds
the bounds on real data.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from kpp import KanervaConfig, KanervaPlusPlus
from pipeline.train.step import train_step


def run(writer: str, batch: int, length: int, precision: str, compile_: bool, steps: int, channels_last: bool) -> dict:
    cfg = KanervaConfig.from_dict({"episode_length": length, "memory": {"writer": writer}}).validate()
    torch.manual_seed(0)
    model = KanervaPlusPlus(cfg).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, fused=True)  # as pipeline.train.optim builds it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.bernoulli(torch.full((batch, length, 1, 28, 28), 0.13)).cuda()
    t0 = time.perf_counter()
    for _ in range(3):
        train_step(net, opt, sched, x, beta=1.0, grad_clip=10.0, precision=precision)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        r = train_step(net, opt, sched, x, beta=1.0, grad_clip=10.0, precision=precision)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"writer": writer, "num_reads": cfg.keys.num_reads if writer == "key" else None, "batch": batch,
            "T": length, "precision": precision, "compile": compile_, "channels_last": channels_last,
            "s_per_step": dt, "images_per_s": batch * length / dt, "warmup_s": warm,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "loss": float(r.terms["loss"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/benchmarks/gpu_speed.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--paper-steps", type=int, default=24400, help="max_steps of jobs/configs/paper_mnist.yaml")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("jobs.gpu_speed: error: no GPU visible to torch")
    torch.backends.cudnn.benchmark = True
    rows = []
    for writer in ("key", "dkm", "vae"):
        for precision in ("fp32", "bf16"):
            rows.append(run(writer, 32, 32, precision, False, args.steps, False))
            print(json.dumps(rows[-1]), flush=True)
    for compile_, cl in ((False, True), (True, False)):
        try:
            rows.append(run("key", 32, 32, "bf16", compile_, args.steps, cl))
        except Exception as e:  # a compile failure is a finding, not a crash of the whole check
            rows.append({"writer": "key", "compile": compile_, "channels_last": cl, "error": repr(e)[:500]})
        print(json.dumps(rows[-1]), flush=True)
    best = min((r for r in rows if r.get("writer") == "key" and "s_per_step" in r), key=lambda r: r["s_per_step"])
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": rows,
              "paper_mnist": {"max_steps": args.paper_steps, "best_setting": best,
                              "expected_hours_per_gpu": args.paper_steps * best["s_per_step"] / 3600}}
    kpp = {r["precision"]: r["s_per_step"] for r in rows if r.get("writer") == "key" and not r.get("compile") and not r.get("channels_last") and "s_per_step" in r}
    vae = {r["precision"]: r["s_per_step"] for r in rows if r.get("writer") == "vae" and "s_per_step" in r}
    report["kpp_over_vae_step_time"] = {p: kpp[p] / vae[p] for p in kpp if p in vae}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
