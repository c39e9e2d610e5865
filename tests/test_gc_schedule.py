"""train.gc_every: Python's collector runs on the loop's schedule, never from inside a step."""
import gc
import weakref

from pipeline.train import config
from pipeline.train.gc_schedule import GcSchedule
from pipeline.train.loop import LocalSession, Loop
from tests.model_helpers import tiny_model_overrides


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only a collection frees it


def test_the_schedule_freezes_what_was_alive_collects_young_cycles_on_its_steps_and_restores():
    assert gc.isenabled()
    with GcSchedule(5) as collector:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        cycle = weakref.ref(Node())
        for step in range(1, 5):
            collector.step(step)
            assert cycle() is not None, f"collected at step {step}, before the schedule's"
        collector.step(5)
        assert cycle() is None and collector.collections == 1
        survivor = Node()
        for _ in range(2):  # alive through two young collections: now in the oldest generation ...
            collector.step(5)
        old, survivor = weakref.ref(survivor), None
        collector.step(5)
        assert old() is not None  # ... which young collections do not walk ...
        collector.full()  # ... and the validation's full collection does
        assert old() is None
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_gc_every_0_is_pythons_own_collection():
    with GcSchedule(0) as collector:
        assert gc.isenabled() and gc.get_freeze_count() == 0
        collector.step(0)
        collector.full()
    assert collector.collections == 0 and gc.isenabled()


def test_no_automatic_collection_runs_inside_the_loop_and_the_loops_own_run_on_schedule(tmp_path):
    """A real loop (LocalSession, digits): gc.callbacks sees only the schedule's collections between the first
    and the last step (young ones every train.gc_every steps, full ones at validation), and the collector is
    Python's again after run()."""
    cfg = config.load(None, [*tiny_model_overrides(), "data.batch_episodes=4", "data.valid_episodes=4",
                             "data.test_episodes=4", "eval.iwae_samples=2", "train.warmup_steps=2",
                             "train.max_steps=12", "train.log_every=2", "checkpoint.every_steps=0",
                             "eval.every_steps=6", "train.gc_every=4", "tracking.enabled=false"])
    loop = Loop(cfg, LocalSession(str(tmp_path)))
    seen = []
    original = loop._steps

    def watched(stop):
        def on_gc(phase, info):
            if phase == "start":
                seen.append((loop.step, info["generation"]))
        gc.callbacks.append(on_gc)
        try:
            return original(stop)
        finally:
            gc.callbacks.remove(on_gc)
    loop._steps = watched
    loop.run()
    # steps 4, 8, 12: young (generation 1); validation at 6 and 12 (the last step): full (generation 2)
    assert sorted(seen) == [(4, 1), (6, 2), (8, 1), (12, 1), (12, 2)], seen
    assert loop.collector.collections == 5 and gc.isenabled() and gc.get_freeze_count() == 0
