"""A process that read a manifest exits cleanly.

Arrow reading from a Python object can abort the interpreter after the job's work is done (`terminate called
without an active exception`, exit -6): an I/O thread releases a PyBuffer during shutdown (apache/arrow#34314).
CI saw it as a job that printed the right error and then died of SIGABRT. The abort needs torch loaded and is
rare per process (about 1 in 7 here with the old read), so the test runs many short processes, a few at a time:
with the old read, 32 clean exits in a row happen about 0.5% of the time."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data.shards.manifest import ShardRecord, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys
import torch  # noqa: F401  the abort needs torch's threads and atexit hooks in the process, as in every job
from pipeline.data.shards.manifest import read_manifest
for _ in range(3):
    records = read_manifest(sys.argv[1])
print(len(records))
"""


def test_many_processes_read_a_manifest_and_exit_cleanly(tmp_path):
    records = [ShardRecord("train", i, f"train-{i:05d}.tar", f"/data/train-{i:05d}.tar", 100, 1000, "ab" * 32)
               for i in range(50)]
    write_manifest(str(tmp_path), records)
    assert read_manifest(str(tmp_path)) == records

    def run(_):
        return subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(32)))
    failed = [(r.returncode, r.stderr[-300:]) for r in results if r.returncode != 0 or r.stdout.strip() != "50"]
    assert not failed, f"{len(failed)} of 32 processes failed: {failed[:3]}"
