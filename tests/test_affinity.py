"""scaling.pin_training_thread: the training thread on a core of its own, the rest of the worker off it.

Affinity is a property of the process's threads, so every check that pins runs in a fresh interpreter: a pin
left in the pytest process would slow every test after it.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from pipeline.train import config
from pipeline.train.affinity import CLAIMS_DIR_ENV, claim_core, claimed, parse_cpu_list

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_two_cores = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                     reason="pinning needs Linux thread affinity and two usable cores")


def _python(code: str, claims_dir, timeout: float = 120) -> dict:
    """Run `code` in a fresh interpreter whose core claims live in `claims_dir` (not the node's: a benchmark
    or training run on this machine may hold one); its last line of output is JSON."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, CLAIMS_DIR_ENV: str(claims_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_pin_claims_the_highest_free_core_never_the_lowest_and_a_closed_claim_frees_it(tmp_path, monkeypatch):
    """Claims are files under KPP_CORE_CLAIMS_DIR locked by the pinning process; they do not need the cores to
    exist, so a four-core node is played here on any machine."""
    monkeypatch.setenv(CLAIMS_DIR_ENV, str(tmp_path))
    first, second, third = claim_core([0, 1, 2, 3]), claim_core([3, 1, 0, 2]), claim_core([0, 1, 2, 3])
    assert (first[0], second[0], third[0]) == (3, 2, 1)
    assert claim_core([0, 1, 2, 3]) is None  # core 0 is kept for everything else
    assert claimed([0, 1, 2, 3]) == {1, 2, 3}
    second[1].close()
    assert claimed([0, 1, 2, 3]) == {1, 3} and claim_core([0, 1, 2, 3])[0] == 2
    for c in (first, third):
        c[1].close()


def test_a_core_claimed_by_another_process_is_passed_over_and_freed_when_that_process_dies(tmp_path, monkeypatch):
    """Two jobs on one node (a sweep's trials) do not share a training core; a crashed worker frees its own."""
    monkeypatch.setenv(CLAIMS_DIR_ENV, str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pipeline.train.affinity import claim_core
        core, f = claim_core([0, 1, 2, 3]); print(core, flush=True); time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, CLAIMS_DIR_ENV: str(tmp_path)})
    try:
        assert holder.stdout.readline().strip() == "3"
        mine = claim_core([0, 1, 2, 3])
        assert mine[0] == 2 and claimed([3]) == {3}
        mine[1].close()
    finally:
        holder.kill()
        holder.wait()
    assert claimed([3]) == set() and claim_core([0, 1, 2, 3])[0] == 3


@needs_two_cores
def test_pinning_moves_the_other_threads_and_child_processes_off_the_training_core_and_release_restores(tmp_path):
    r = _python("""
        import json, os, subprocess, sys, threading
        from pipeline.train.affinity import pin_training_thread
        allowed = sorted(os.sched_getaffinity(0))
        before = threading.Event(); stop = threading.Event()
        early = threading.Thread(target=stop.wait); early.start()          # a helper that predates the pin
        pin = pin_training_thread()
        late = threading.Thread(target=stop.wait); late.start()            # started by the pinned thread
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        import time; time.sleep(0.3)
        inherited = {"late": sorted(os.sched_getaffinity(late.native_id)), "child": sorted(os.sched_getaffinity(child.pid))}
        moved = pin.spread()
        after = {"me": sorted(os.sched_getaffinity(0)), "early": sorted(os.sched_getaffinity(early.native_id)),
                 "late": sorted(os.sched_getaffinity(late.native_id)), "child": sorted(os.sched_getaffinity(child.pid))}
        pin.release()
        released = {"me": sorted(os.sched_getaffinity(0)), "late": sorted(os.sched_getaffinity(late.native_id)),
                    "child": sorted(os.sched_getaffinity(child.pid))}
        child.kill(); stop.set()
        print(json.dumps({"allowed": allowed, "core": pin.core, "inherited": inherited, "moved": moved,
                          "after": after, "released": released}))
    """, tmp_path)
    core, others = r["allowed"][-1], r["allowed"][:-1]
    assert r["core"] == core
    # what the pinned thread starts inherits its core until the next spread (the loop spreads at log steps)
    assert r["inherited"] == {"late": [core], "child": [core]}
    assert r["moved"] >= 2
    assert r["after"] == {"me": [core], "early": others, "late": others, "child": others}
    assert r["released"] == {"me": r["allowed"], "late": r["allowed"], "child": r["allowed"]}


@needs_two_cores
def test_a_spread_within_its_interval_walks_nothing_and_the_next_one_moves_what_was_started(tmp_path):
    r = _python("""
        import json, os, threading, time
        from pipeline.train.affinity import pin_training_thread
        stop = threading.Event()
        pin = pin_training_thread()  # walks once
        late = threading.Thread(target=stop.wait); late.start()
        early_call = pin.spread(min_interval_s=60.0)
        still = sorted(os.sched_getaffinity(late.native_id))
        due_call = pin.spread(min_interval_s=0.0)
        after = sorted(os.sched_getaffinity(late.native_id))
        pin.release(); stop.set()
        print(json.dumps({"core": pin.core, "others": sorted(pin.others), "early": early_call, "still": still,
                          "due": due_call, "after": after}))
    """, tmp_path)
    assert r["early"] == 0 and r["still"] == [r["core"]]  # within the interval: not walked, the thread stays
    assert r["due"] >= 1 and r["after"] == r["others"]


@needs_two_cores
def test_with_one_usable_core_nothing_is_pinned_and_the_reason_is_printed(tmp_path):
    r = _python("""
        import io, json, os, contextlib
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from pipeline.train.affinity import pin_training_thread
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            pin = pin_training_thread()
        print(json.dumps({"pin": pin is None, "said": out.getvalue(), "me": len(os.sched_getaffinity(0))}))
    """, tmp_path)
    assert r["pin"] and r["me"] == 1
    assert "scaling.pin_training_thread" in r["said"] and "not pinned" in r["said"]


@needs_two_cores
def test_with_every_core_but_the_lowest_claimed_by_other_workers_nothing_is_pinned(tmp_path):
    r = _python(f"""
        import io, json, os, contextlib
        from pipeline.train.affinity import claim_core, pin_training_thread
        others = [claim_core(sorted(os.sched_getaffinity(0))) for _ in range(len(os.sched_getaffinity(0)) - 1)]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            pin = pin_training_thread()
        print(json.dumps({{"unpinned": pin is None, "said": out.getvalue()}}))
    """, tmp_path)
    assert r["unpinned"] and "no core to claim" in r["said"]


@needs_two_cores
def test_the_loop_steps_on_its_core_reports_from_the_others_and_gives_the_cores_back(tmp_path):
    """A short real loop (LocalSession, digits) with the pin on: every report, made on the checkpointer's thread,
    sees the training thread on the top core and itself on the rest; after run() the process has its cores back."""
    r = _python(f"""
        import json, os, threading, torch
        torch.set_num_threads(1)
        from pipeline.train import config
        from pipeline.train.loop import LocalSession, Loop
        from tests.model_helpers import tiny_model_overrides
        seen = []
        class Watching(LocalSession):
            def report(self, metrics, folder, name):
                seen.append({{"training": sorted(os.sched_getaffinity(loop.pin.training_tid)),
                             "reporter": sorted(os.sched_getaffinity(0))}})
                super().report(metrics, folder, name)
        cfg = config.load(None, [*tiny_model_overrides(), "data.batch_episodes=4", "data.valid_episodes=4",
                                 "data.test_episodes=4", "eval.iwae_samples=2", "train.warmup_steps=2",
                                 "train.max_steps=6", "train.log_every=2", "checkpoint.every_steps=3",
                                 "tracking.enabled=false", "scaling.pin_training_thread=true"])
        allowed = sorted(os.sched_getaffinity(0))
        loop = Loop(cfg, Watching({str(tmp_path)!r}))
        loop.run()
        masks = set()
        for t in os.listdir("/proc/self/task"):
            try:
                masks.add(len(os.sched_getaffinity(int(t))))
            except ProcessLookupError:  # a thread that ended meanwhile (the loader's, the checkpointer's)
                pass
        print(json.dumps({{"allowed": allowed, "seen": seen, "after": sorted(os.sched_getaffinity(0)),
                          "threads": sorted(masks)}}))
    """, tmp_path / "claims", timeout=300)
    core, others = r["allowed"][-1], r["allowed"][:-1]
    assert r["seen"], "no report was made"
    assert all(s == {"training": [core], "reporter": others} for s in r["seen"]), r["seen"]
    assert r["after"] == r["allowed"] and r["threads"] == [len(r["allowed"])]


def test_a_fractional_worker_cannot_pin_its_training_thread():
    with pytest.raises(config.ConfigError, match=r"scaling\.pin_training_thread.*whole scaling\.cpus_per_worker"):
        config.load(None, ["scaling.pin_training_thread=true", "scaling.cpus_per_worker=0.5"])
    assert config.load(None, ["scaling.pin_training_thread=true", "scaling.cpus_per_worker=2"]).scaling.pin_training_thread


def test_a_cpu_list_reads_as_taskset_writes_it_and_a_bad_one_names_its_part():
    assert parse_cpu_list("15") == {15} and parse_cpu_list("12-15") == {12, 13, 14, 15}
    assert parse_cpu_list("0,2,4-6") == {0, 2, 4, 5, 6} and parse_cpu_list("3, 1") == {1, 3}
    for bad, part in (("a", "'a'"), ("3-1", "'3-1'"), ("1,,2", "''"), ("-1", "'-1'"), ("1-", "'1-'")):
        with pytest.raises(ValueError, match=re.escape(part)):
            parse_cpu_list(bad)


@needs_two_cores
def test_a_reserved_core_outside_the_workers_mask_is_claimed_and_the_rest_stays_on_the_mask(tmp_path):
    """Ray started under `taskset -c <the rest>`: its workers inherit a mask without the reserved core. The
    training thread goes there all the same; everything else of the worker stays on its own mask, and release
    gives the thread that mask back."""
    r = _python("""
        import json, os, subprocess, sys, threading
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(cores[:-1]))                 # as a worker of a raylet started off the top core
        from pipeline.train.affinity import claimed, pin_training_thread
        stop = threading.Event()
        early = threading.Thread(target=stop.wait); early.start()
        pin = pin_training_thread(frozenset({cores[-1]}))
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        pin.spread()
        after = {"me": sorted(os.sched_getaffinity(0)), "early": sorted(os.sched_getaffinity(early.native_id)),
                 "child": sorted(os.sched_getaffinity(child.pid)), "held": sorted(claimed(cores))}
        pin.release()
        released = {"me": sorted(os.sched_getaffinity(0)), "held": sorted(claimed(cores))}
        child.kill(); stop.set()
        print(json.dumps({"cores": cores, "core": pin.core, "after": after, "released": released}))
    """, tmp_path)
    top, rest = r["cores"][-1], r["cores"][:-1]
    assert r["core"] == top
    assert r["after"] == {"me": [top], "early": rest, "child": rest, "held": [top]}
    assert r["released"] == {"me": rest, "held": []}


@needs_two_cores
def test_reserved_cores_all_claimed_or_not_on_this_node_fail_naming_the_field(tmp_path):
    r = _python("""
        import json, os
        from pipeline.train.affinity import claim_core, pin_training_thread
        top = sorted(os.sched_getaffinity(0))[-1]
        said = {}
        held = claim_core([top], keep_lowest=False)               # another worker's training thread
        try:
            pin_training_thread(frozenset({top}))
        except RuntimeError as e:
            said["claimed"] = str(e)
        held[1].close()
        try:
            pin_training_thread(frozenset({4095}))                 # no such core here
        except RuntimeError as e:
            said["missing"] = str(e)
        print(json.dumps({"said": said, "top": top, "me": sorted(os.sched_getaffinity(0))}))
    """, tmp_path)
    assert f"scaling.training_cores={r['top']}: every one is claimed" in r["said"]["claimed"]
    assert "scaling.training_cores=4095: cannot run on core 4095 here" in r["said"]["missing"]
    assert len(r["me"]) >= 2  # a refused pin changes nothing


def test_training_cores_need_the_pin_and_a_valid_cpu_list():
    with pytest.raises(config.ConfigError, match=r"scaling\.training_cores: needs scaling\.pin_training_thread"):
        config.load(None, ["scaling.training_cores=3"])
    with pytest.raises(config.ConfigError, match=r"scaling\.training_cores: '4-2'"):
        config.load(None, ["scaling.pin_training_thread=true", "scaling.training_cores=4-2"])
    s = config.load(None, ["scaling.pin_training_thread=true", "scaling.training_cores=15"]).scaling
    assert s.training_cores == "15"  # read as an integer from the command line, kept as the list it is
