"""Benchmark (not a test): images/s and MB/s of the episode reader from local shards and from an S3 endpoint,
with 0, 1 and 2 DataLoader workers; writes JSON.

    python -m research.benchmark_data --out outputs/benchmark_data.json

Real data: binarized MNIST (bit-packed shards) and MNIST (8-bit; plain and with gzipped blocks, prepare --compress)
from ../shared/data, prepared into a temporary
directory and onto a moto S3 server started here as its own process on 127.0.0.1 (a free port). Per
configuration it reports the whole epoch including worker start-up (epoch_images_per_s) and the steady rate
after the first batch (steady_images_per_s); MB/s counts shard bytes fetched from the store (each worker
fetches the shards under its batches, so with 2 workers a rank reads its shards twice).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import time

from pipeline.data.shards.prepare import PrepareConfig, prepare
from pipeline.data.shards.reader import Cursor, StreamConfig, make_loader
from pipeline.net import free_port

SHARED_DATA = pathlib.Path(os.environ.get("KPP_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
# name -> (dataset, source folder, gzip the image blocks)
DATASETS = {"binarized_mnist": ("binarized_mnist", "binarized_mnist", False), "mnist": ("mnist", "mnist", False),
            "mnist_gzip": ("mnist", "mnist", True)}


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto server did not start")


def measure(config: StreamConfig, workers: int, epochs: int, context: str) -> dict:
    results = []
    for epoch in range(epochs):
        started = time.perf_counter()
        loader = make_loader(config, rank=0, world_size=1, cursor=Cursor(epoch), num_workers=workers,
                             multiprocessing_context=context if workers else None)
        images = fetched = 0
        first_batch_at = first_images = None
        for batch in loader:
            images += int(batch.mask.sum())
            fetched += batch.bytes_fetched
            if first_batch_at is None:
                first_batch_at, first_images = time.perf_counter(), images
        elapsed = time.perf_counter() - started
        steady = time.perf_counter() - first_batch_at
        results.append({"epoch_s": elapsed, "images": images, "bytes": fetched,
                        "epoch_images_per_s": images / elapsed, "epoch_MB_per_s": fetched / elapsed / 1e6,
                        "steady_images_per_s": (images - first_images) / max(steady, 1e-9)})
    best = max(results, key=lambda r: r["epoch_images_per_s"])
    return {"workers": workers, "context": context if workers else None, "epochs": results, "best_epoch_images_per_s": round(best["epoch_images_per_s"]),
            "best_epoch_MB_per_s": round(best["epoch_MB_per_s"], 1),
            "best_steady_images_per_s": round(max(r["steady_images_per_s"] for r in results))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.benchmark_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/benchmark_data.json", help="where to write the JSON report")
    parser.add_argument("--episode-length", type=int, default=32, help="T (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="episodes per batch (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per configuration; best is reported (default 3)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts (default 0,1,2)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"which of {list(DATASETS)} (default all)")
    parser.add_argument("--stores", default="local,s3", help="local and/or s3 (default both)")
    parser.add_argument("--context", default="fork", choices=("fork", "spawn", "forkserver"),
                        help="how DataLoader workers start (default fork; spawn adds ~2 s of imports per worker)")
    args = parser.parse_args(argv)

    server, endpoint = start_moto()
    storage_options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench",
                       "client_kwargs": {"region_name": "us-east-1"}}
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    # Load average: on a shared 2-core machine other jobs change these figures; it says how busy it was.
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                          "load_average_1m_at_start": os.getloadavg()[0]},
              "episode_length": args.episode_length, "batch_size": args.batch_size, "images_per_batch":
              args.episode_length * args.batch_size, "runs": []}
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.datasets.split(","):
                dataset, folder, compress = DATASETS[name]
                roots = {"local": f"{tmp}/{name}", "s3": f"s3://bench/{name}"}
                for store in args.stores.split(","):
                    root = roots[store]
                    prepare(PrepareConfig(dataset=dataset, source=str(SHARED_DATA / folder), out=root, splits=("train",),
                                          compress=compress, progress=False,
                                          storage_options=storage_options if store == "s3" else {}))
                    config = StreamConfig(root=root, episode_length=args.episode_length, batch_size=args.batch_size,
                                          storage_options=storage_options if store == "s3" else {})
                    for workers in (int(w) for w in args.workers.split(",")):
                        run = {"dataset": name, "store": store, **measure(config, workers, args.epochs, args.context)}
                        report["runs"].append(run)
                        print(f"{name:16s} {store:5s} workers={workers}: {run['best_epoch_images_per_s']:>9,} images/s "
                              f"(steady {run['best_steady_images_per_s']:,}), {run['best_epoch_MB_per_s']} MB/s",
                              file=sys.stderr)
    finally:
        server.kill()
    report["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({r["dataset"] + "/" + r["store"] + f"/w{r['workers']}": r["best_epoch_images_per_s"]
                      for r in report["runs"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
