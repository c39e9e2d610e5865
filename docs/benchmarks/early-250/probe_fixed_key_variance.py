"""Probe: the keys' posterior log-variance held at its initial value (model.keys.init_logvar) for the whole run:
the gradients of the logvar half of key_posterior are zeroed, so neither the key KL nor KL_z can widen the keys
(probe_key_variance_grad.py: both do at step 0). The key means still learn. From the repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_fixed_key_variance.py --name early-key-fixedvar \
        --source ../shared/data/binarized_mnist --steps 250 --threads 1 --test-episodes 32 --iwae-samples 8 \
        model.memory.writer=key model.objective.kl_warmup_steps=100 model.keys.init_logvar=-2
"""
import torch

from kpp import model
from kpp.model import KEY_DIM

orig_init = model.KanervaPlusPlus.__init__


def init(self, cfg):
    orig_init(self, cfg)
    k = cfg.keys.num_reads
    mask = torch.ones(k, 2, KEY_DIM)
    mask[:, 1] = 0.0  # output layout [K, (mean, logvar), 3]: the logvar half gets no gradient
    self.key_posterior.weight.register_hook(lambda g: g * mask.reshape(-1, 1).to(g))
    self.key_posterior.bias.register_hook(lambda g: g * mask.reshape(-1).to(g))
    with torch.no_grad():  # and no input dependence: the variance is the initial one for every image
        self.key_posterior.weight.view(k, 2, KEY_DIM, -1)[:, 1].zero_()


model.KanervaPlusPlus.__init__ = init
from research import memory_experiment  # noqa: E402

memory_experiment.main()
