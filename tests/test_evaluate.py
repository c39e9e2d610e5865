"""The bounds are computed right: IWAE is never looser than the ELBO, the swap gap is paired and exact, the
leave-one-out memory really excludes the image, and units follow the data."""
import math

import pytest
import torch

from kpp import KanervaPlusPlus
from kpp.evaluate import batch_swap_gap, describe, evaluate, iwae_bound
from kpp.model import Noise
from tests.model_helpers import MAP_MEMORY, tiny_config
from tests.test_model import binary_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KanervaPlusPlus(tiny_config()).eval()


@pytest.mark.parametrize("samples", [16, 64])
def test_iwae_is_never_looser_than_the_elbo(model, samples):
    x = binary_batch(4)
    torch.manual_seed(1)
    with torch.no_grad():
        log_w = model.log_weights(x, samples)
        iwae = iwae_bound(log_w)
        elbo_same_draws = -log_w.mean(0)
        analytic = torch.stack([model.terms(x)["total"] for _ in range(samples)]).mean(0)
    assert torch.all(iwae <= elbo_same_draws + 1e-4)  # Jensen, draw by draw
    # Against the analytic-KL ELBO the reported one: the gap must be positive on average over the batch.
    assert iwae.mean() < analytic.mean()
    # The single-sample estimate is the ELBO: with S=1 the IWAE bound is -log w.
    assert torch.allclose(iwae_bound(log_w[:1]), -log_w[0])


def test_evaluate_reports_iwae_below_elbo_and_is_reproducible(model):
    x = binary_batch(4, seed=3)
    a = evaluate(model, x, iwae_samples=16, seed=5, batch_size=3)
    b = evaluate(model, x, iwae_samples=16, seed=5, batch_size=3)
    assert a == b
    assert a["iwae"] < a["neg_elbo"] and a["loo_iwae"] < a["loo_neg_elbo"] and a["chain_iwae"] < a["chain_neg_elbo"]
    assert a["unit"] == "nats/image" and a["num_images"] == 24
    assert sum(a[f"kl_y_key{k}"] for k in range(2)) == pytest.approx(a["kl_y"], rel=1e-5)
    for label in ("chain -ELBO", "leave-one-out -ELBO", "memory-conditional -ELBO (x_t in its own memory; the paper's"):
        assert label in describe(a)
    assert not model.training


def test_swap_gap_is_exactly_the_paired_difference(model):
    x = binary_batch(4, seed=4)
    result = evaluate(model, x, iwae_samples=2, seed=9, batch_size=4, leave_one_out=False)
    # Recompute by hand with the evaluator's draws: same generator, same order of draws.
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        memories = model.write(model.encode(x))
        noise = Noise.draw(model.cfg, 4, 6, generator=g)
        own = model.terms(x, memory=memories, noise=noise)["total"].mean()
        swapped = model.terms(x, memory=memories.roll(-1, 0), noise=noise)["total"].mean()
    assert result["swap_gap"] == pytest.approx((swapped - own).item(), abs=1e-4)
    assert result["neg_elbo"] == pytest.approx(own.item(), abs=1e-4)
    # The training-time version on one batch is the same quantity.
    assert batch_swap_gap(model, x, seed=9) == pytest.approx(result["swap_gap"], abs=1e-4)


def test_swap_gap_is_zero_when_the_memory_cannot_differ():
    torch.manual_seed(0)
    x = binary_batch(1).repeat(3, 1, 1, 1, 1)  # three copies of one episode: every memory is the same
    model = KanervaPlusPlus(tiny_config()).eval()
    assert evaluate(model, x, iwae_samples=2, leave_one_out=False)["swap_gap"] == pytest.approx(0.0, abs=1e-4)
    # A memory the episode does not write to: paired draws make the gap exactly zero, not sampling noise.
    no_memory = KanervaPlusPlus(tiny_config(memory={"writer": "none"})).eval()
    assert evaluate(no_memory, binary_batch(4), iwae_samples=2)["swap_gap"] == 0.0


@pytest.mark.parametrize("content", ["code", "map"])
def test_swap_gap_sees_a_memory_that_matters(content):
    # An untrained model has no reason to prefer its own memory, so only the size of the gap is checked here.
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config() if content == "code" else tiny_config(**MAP_MEMORY)).eval()
    with torch.no_grad():  # make the prior depend strongly on the memory content (the code: what the writes hold)
        (model.writer.code if content == "code" else model.writer.block).weight.mul_(1000)
    x = torch.zeros(4, 6, 1, 28, 28)
    x[1::2] = 1.0  # episodes alternate between blank and full, so their memories differ a lot
    assert abs(evaluate(model, x, iwae_samples=2, leave_one_out=False)["swap_gap"]) > 1.0


def test_leave_one_out_memory_excludes_exactly_that_image(model):
    x = binary_batch(2, seed=6)
    with torch.no_grad():
        loo = model.leave_one_out_memories(x)
        expected = model.write(model.encode(torch.cat([x[:, :2], x[:, 3:]], 1)))
        assert loo.shape == (2, 6, *expected.shape[1:])
        assert torch.allclose(loo[:, 2], expected)
        x2 = x.clone()
        x2[:, 2] = 1 - x2[:, 2]
        loo2 = model.leave_one_out_memories(x2)
    assert torch.equal(loo2[:, 2], loo[:, 2])  # image 2's own memory never sees image 2
    assert not torch.allclose(loo2[:, 0], loo[:, 0])  # every other image's does


def test_bits_per_dim_for_8bit_data():
    cfg = tiny_config(bit_depth=8, likelihood={"kind": "logistic_mixture", "num_mixtures": 2})
    torch.manual_seed(0)
    model = KanervaPlusPlus(cfg).eval()
    x = torch.randint(0, 256, (2, 6, 1, 28, 28)).float() / 255
    result = evaluate(model, x, iwae_samples=2, leave_one_out=False, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        noise = Noise.draw(cfg, 2, 6, generator=g)
        nats = model.terms(x, noise=noise)["total"].mean().item()
    assert result["unit"] == "bits/dim"
    assert result["neg_elbo"] == pytest.approx(nats / (784 * math.log(2)), rel=1e-4)


def test_evaluate_needs_two_episodes(model):
    with pytest.raises(ValueError, match="at least 2 episodes"):
        evaluate(model, binary_batch(1))
