"""Probe: what in the write slows early training? Detach the writer's inputs: embedding, keys or both. From the
repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_detach_write_inputs.py keys --name early-key-detach-keys \
        --source ../shared/data/binarized_mnist --steps 250 --threads 1 --test-episodes 32 --iwae-samples 8 \
        model.memory.writer=key model.objective.kl_warmup_steps=100
"""
import sys
from kpp import memory
which = sys.argv.pop(1)
orig = memory.KeyWriter.contributions
def contributions(self, embedding, key_mean):
    if which in ("embedding", "both"):
        embedding = embedding.detach()
    if which in ("keys", "both"):
        key_mean = key_mean.detach()
    return orig(self, embedding, key_mean)
memory.KeyWriter.contributions = contributions
from research import memory_experiment
memory_experiment.main()
