"""The chain bound: x_t scored under a memory written from x_1..x_{t-1} only. Nothing of x_s for s >= t may reach
the memory x_t's prior reads (q may look at anything), through the write or through the encoder's temporal shift;
leave-one-out memories keep every other image at its own place; the models without a prefix memory keep their
own bound."""
import pytest
import torch

from kpp import KanervaPlusPlus
from kpp.config import ConfigError
from kpp.encoder import temporal_shift
from kpp.evaluate import evaluate, episode_bounds
from kpp.model import Noise
from tests.model_helpers import MAP_MEMORY, tiny_config

T = 6
IMAGE = (1, 28, 28)
# the code memory of the paper's objective: each position writes and reads its own grid cell (x_t reads its copy)
GRID_COPY = {"keys": {"num_reads": 1, "layout": "grid", "logvar": "shared", "init_logvar": -4.0},
             "memory": {"write_span": 1.0}, "objective": {"memory": "episode"}}


def episodes(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, T, *IMAGE, generator=torch.Generator().manual_seed(seed)).round()


def with_later_images_changed(x: torch.Tensor, t: int) -> torch.Tensor:
    """x with images t, t+1, ... (0-based) replaced by others."""
    other = x.clone()
    other[:, t:] = episodes(x.shape[0], seed=99)[:, t:]
    return other


WRITERS = {
    "code memory": {},
    "map memory": MAP_MEMORY,
    "dense writer": {"memory": {"writer": "dense", "channels": 4}},
    "bidirectional shift (re-encoded per prefix)": {"encoder": {"shift_direction": "both"},
                                                    "objective": {"memory": "episode"}},
}


@pytest.mark.parametrize("overrides", WRITERS.values(), ids=WRITERS.keys())
def test_later_images_never_reach_the_memory_an_image_is_scored_under(overrides):
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(**overrides)).eval()
    x = episodes()
    with torch.no_grad():
        memories = model.chain_memories(x)
        for t in range(1, T):
            changed = model.chain_memories(with_later_images_changed(x, t))
            # image t's memory (and every earlier one) is bit-identical; the next one holds x_t and differs
            assert torch.equal(changed[:, : t + 1], memories[:, : t + 1]), f"x_{t}.. leaked into memory {t}"
            assert not torch.equal(changed[:, t + 1 :], memories[:, t + 1 :]) or t == T - 1
        # the first image is scored under the empty memory
        assert torch.allclose(memories[:, 0], model.writer.empty(x.shape[0]), atol=1e-6)


@pytest.mark.parametrize("overrides", WRITERS.values(), ids=WRITERS.keys())
def test_the_prior_an_image_is_scored_under_ignores_later_images(overrides):
    """The prior p(z_t | reads) from image t's memory, read at the same keys: unchanged when x_t.. change."""
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(**overrides)).eval()
    x = episodes()
    keys = torch.randn(x.shape[0], T, model.cfg.keys.num_reads, 3)
    with torch.no_grad():
        prior = model.read_prior(model.chain_memories(x), keys)
        for t in range(1, T):
            other = model.read_prior(model.chain_memories(with_later_images_changed(x, t)), keys)
            assert torch.equal(other[0][:, t], prior[0][:, t]) and torch.equal(other[1][:, t], prior[1][:, t])


def test_the_online_shift_never_looks_ahead_and_the_published_one_does():
    x = torch.randn(2 * T, 16, 3, 3)
    later = x.view(2, T, 16, 3, 3).clone()
    later[:, 3:] += 1.0
    later = later.view(2 * T, 16, 3, 3)
    past = temporal_shift(x, T, 0.125, "past").view(2, T, 16, 3, 3)
    past_later = temporal_shift(later, T, 0.125, "past").view(2, T, 16, 3, 3)
    assert torch.equal(past[:, :3], past_later[:, :3])
    assert torch.equal(past[:, 1:, :2], x.view(2, T, 16, 3, 3)[:, :-1, :2])  # frame t takes t-1's first channels
    both = temporal_shift(x, T, 0.125, "both").view(2, T, 16, 3, 3)
    both_later = temporal_shift(later, T, 0.125, "both").view(2, T, 16, 3, 3)
    assert not torch.equal(both[:, 2], both_later[:, 2])  # frame 2 sees frame 3


def test_the_chain_objective_scores_each_image_under_its_prefix_memory():
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config())
    x = episodes()
    torch.manual_seed(5)
    trained = model(x)["total"]
    torch.manual_seed(5)
    expected = model.terms(x, memory=model.chain_memories(x))["total"]
    assert torch.equal(trained, expected)
    torch.manual_seed(5)
    paper = KanervaPlusPlus(tiny_config(objective={"memory": "episode"}))
    paper.load_state_dict(model.state_dict())
    assert not torch.allclose(paper(x)["total"], trained)


def test_a_chain_objective_with_an_encoder_that_looks_ahead_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="encoder.shift_direction"):
        tiny_config(encoder={"shift_direction": "both"})  # objective.memory=chain is the default
    tiny_config(encoder={"shift_direction": "both", "shift_fraction": 0.0})  # no shift: nothing looks ahead
    tiny_config(encoder={"shift_direction": "both"}, objective={"memory": "episode"})  # the paper's objective
    with pytest.raises(ConfigError, match="objective.held_out"):
        tiny_config(objective={"held_out": 2})


def test_the_bounds_of_a_model_without_memory_are_all_its_own_bound():
    """writer=none (through the prefix memories) and the VAE: with nothing written, the chain, leave-one-out and
    memory-conditional bounds are one number, so a model that ignores the episode scores its own bound."""
    x = episodes(4)
    for writer in ("none", "vae"):
        torch.manual_seed(0)
        model = KanervaPlusPlus(tiny_config(memory={"writer": writer}))
        r = evaluate(model, x, iwae_samples=3, seed=1)
        assert r["chain_neg_elbo"] == pytest.approx(r["neg_elbo"], rel=1e-6)
        assert r["loo_neg_elbo"] == pytest.approx(r["neg_elbo"], rel=1e-6)
        # the IWAE bounds draw their own samples; with the same draws they agree too
        with torch.no_grad():
            chain = model.log_weights(x, 3, memory=model.chain_memories(x), generator=torch.Generator().manual_seed(2))
            own = model.log_weights(x, 3, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(chain, own, rtol=1e-6)


def test_the_chain_curve_averages_to_the_chain_bound_and_a_memory_moves_it():
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(**GRID_COPY))
    x = episodes(4)
    r = evaluate(model, x, iwae_samples=2, seed=1)
    assert len(r["chain_curve"]) == T and len(r["chain_iwae_curve"]) == T
    assert sum(r["chain_curve"]) / T == pytest.approx(r["chain_neg_elbo"], rel=1e-5)
    assert sum(r["chain_iwae_curve"]) / T == pytest.approx(r["chain_iwae"], rel=1e-5)
    # the copy reads back x_t's own code in its own memory, nothing in the chain's: the bounds part
    assert r["chain_neg_elbo"] > r["neg_elbo"]
    per_episode = episode_bounds(model, x, iwae_samples=2, seed=1)
    assert per_episode["chain_neg_elbo"].mean().item() == pytest.approx(r["chain_neg_elbo"], rel=1e-5)


def test_dkm_and_km_keep_their_own_proper_bound():
    x = episodes(4)
    for writer in ("dkm", "km"):
        torch.manual_seed(0)
        model = KanervaPlusPlus(tiny_config(memory={"writer": writer}))
        r = evaluate(model, x, iwae_samples=2, seed=1)
        assert r["chain_neg_elbo"] == r["neg_elbo"] and r["kl_m"] > 0  # the bound pays for the memory
        with pytest.raises(ValueError, match="their chain bound is that bound"):
            model.chain_memories(x)


def test_after_leaving_image_t_out_its_grid_cell_is_empty():
    """keys.layout=grid: leave-one-out re-encodes the other images at their own positions, so image t's cell holds
    nothing (the code memory's coverage channel: 0 there) and every other image's cell is where it was."""
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(**GRID_COPY, encoder={"shift_fraction": 0.0})).eval()
    x = episodes(2)
    with torch.no_grad():
        enc = model.encode(x)
        own_coverage = model.writer.contributions(enc.embedding, enc.key_mean)[:, :, -1]  # [B, T, H, W]
        loo_coverage = model.leave_one_out_memories(x)[:, :, -1]
    for t in range(T):
        others = own_coverage[:, [s for s in range(T) if s != t]].sum(1)
        assert torch.allclose(loo_coverage[:, t], others, atol=1e-5)
        cell = own_coverage[:, t] > 0.5  # where image t's own write lies
        assert cell.any() and loo_coverage[:, t][cell].max() < 0.5
