"""The code memory (memory.content=code) and the keys that start on a grid with a shared log-variance
(keys.layout=grid, keys.logvar=shared): a written code is read back at its own key, the prior starts as the
posterior, the coverage makes a partial read whole, and the bad settings are refused naming their field."""
import pytest
import torch

from kpp import KanervaConfig, KanervaPlusPlus
from kpp.checkpoint import load_model, save_model
from kpp.config import ConfigError
from kpp.evaluate import batch_swap_gap, evaluate
from kpp.memory import COVERAGE_FLOOR, key_to_affine, normalise_by_coverage, place, read
from kpp.objective import gaussian_kl
from tests.model_helpers import MAP_MEMORY, tiny_config

CODE = {"memory": {"channels": 16, "content": "code"}, "keys": {"layout": "grid", "logvar": "shared",
                                                             "init_logvar": -4.0}}
MAP = MAP_MEMORY


def code_model(reads: int = 1, span: float = 1.0, seed: int = 0) -> KanervaPlusPlus:
    torch.manual_seed(seed)
    # the paper's objective: the readout starts as the whole code, so x_t's own write gives back q(z_t | X)
    cfg = tiny_config(memory={**CODE["memory"], "write_span": span}, keys={**CODE["keys"], "num_reads": reads},
                      objective={"memory": "episode"})
    return KanervaPlusPlus(cfg)


def episodes(model: KanervaPlusPlus, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, model.cfg.episode_length, *model.cfg.image_shape, generator=g) > 0.7).float()


@pytest.mark.parametrize("reads,span", [(1, 1.0), (2, 1.0), (1, 2.0)])
def test_at_step_0_each_image_reads_back_its_own_posterior_code(reads, span):
    model = code_model(reads, span)
    x = episodes(model)
    with torch.no_grad():
        enc = model.encode(x)
        mean, logvar = model.read_prior(model.write(enc), enc.key_mean)
        kl = gaussian_kl(enc.z_mean, enc.z_logvar, mean, logvar).sum(-1)
        # another episode's memory read at the same keys gives that episode's codes, not these
        other_mean, _ = model.read_prior(model.write(enc).roll(1, dims=0), enc.key_mean)
    # (the tiny 8 x 8 memory's cells are under 3 pixels wide: a little of the neighbours' writes bleeds in)
    assert torch.allclose(mean, enc.z_mean, atol=0.06) and torch.allclose(logvar, enc.z_logvar, atol=0.06)
    assert kl.max() < 0.01
    assert (other_mean - enc.z_mean).abs().mean() > 4 * (mean - enc.z_mean).abs().mean()


def test_the_default_map_memory_does_not_read_back_the_posterior_at_step_0():
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(**MAP))
    x = episodes(model)
    with torch.no_grad():
        enc = model.encode(x)
        mean, _ = model.read_prior(model.write(enc), enc.key_mean)
    assert not torch.allclose(mean, enc.z_mean, atol=0.06)  # what the code memory changes


def test_a_read_over_part_of_a_write_returns_its_code_at_full_strength():
    code = torch.randn(1, 1, 5, 1, 1)
    block = torch.cat([code, torch.ones(1, 1, 1, 1, 1)], dim=2).expand(-1, -1, -1, 4, 4)
    write = torch.tensor([[[[0.25, 0.0, 0.0], [0.0, 0.25, 0.0]]]])
    memory = place(block, write, 16, 16)[:, 0]  # [1, 6, 16, 16]: the code and its coverage
    # a read of the same size whose centre is a quarter of its side off the write's: it covers ~3/4 of the write
    shifted = torch.tensor([[[[0.25, 0.0, 0.06], [0.0, 0.25, 0.0]]]])
    raw = read(memory, shifted, 4)
    coverage = raw[:, :, -1].mean()
    assert COVERAGE_FLOOR < coverage < 0.95
    back = normalise_by_coverage(raw).mean((-1, -2))[:, :, :-1]  # (its last channel: the coverage itself)
    assert torch.allclose(back, code.view(1, 1, 5), atol=1e-5)
    assert not torch.allclose(raw[:, :, :-1].mean((-1, -2)), code.view(1, 1, 5), atol=1e-2)


def test_grid_keys_start_each_read_in_a_cell_of_its_own():
    model = code_model(reads=2)
    cfg = model.cfg
    with torch.no_grad():
        enc = model.encode(episodes(model))
        theta = key_to_affine(enc.key_mean, cfg.keys.min_scale, cfg.keys.max_scale)  # [B, T, K, 2, 3]
    centres = theta[0, :, :, :, 2].reshape(-1, 2)
    distances = torch.cdist(centres, centres) + 10 * torch.eye(centres.shape[0])
    side = 4  # 6 images x 2 reads: a 4 x 4 grid
    assert distances.min() > 0.5 * (2 / side)  # every pair over half a cell apart (the means are near the offsets)
    assert torch.allclose(theta[..., 0, 0], torch.full_like(theta[..., 0, 0], 1 / side), atol=0.04)


def test_a_shared_key_log_variance_is_one_parameter_per_read_and_coordinate():
    model = code_model(reads=2)
    x = episodes(model)
    enc = model.encode(x)
    assert model.key_logvar.shape == (2, 3)
    assert torch.equal(enc.key_logvar, model.key_logvar.expand_as(enc.key_logvar))
    enc.key_logvar.sum().backward()
    assert model.key_logvar.grad is not None and model.key_posterior.weight.grad is None


def train(model: KanervaPlusPlus, x: torch.Tensor, steps: int = 15) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x, beta=1.0)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


def test_the_code_memory_is_used_from_the_first_steps_and_every_parameter_learns():
    model = code_model()
    x = episodes(model, batch=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, x)
    assert losses[-1] < losses[0]
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    # after 15 steps another episode's memory costs the code model nats; the map model's memory is still ignored
    torch.manual_seed(0)
    map_model = KanervaPlusPlus(tiny_config(**MAP))
    train(map_model, x)
    code_gap, map_gap = batch_swap_gap(model, x), batch_swap_gap(map_model, x)
    assert code_gap > 0.05 and code_gap > 20 * abs(map_gap), (code_gap, map_gap)


def test_code_memory_evaluation_leave_one_out_and_save_load(tmp_path):
    model = code_model(reads=2, span=2.0)
    x = episodes(model, batch=2)
    result = evaluate(model, x, iwae_samples=2)
    assert result["iwae"] <= result["neg_elbo"] + 1e-3
    assert result["swap_gap"] > 0
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.cfg == model.cfg
    assert evaluate(loaded, x, iwae_samples=2) == result


@pytest.mark.parametrize("gain", [0.0, 0.25])
def test_image_shift_gain_scales_the_image_part_of_the_shifts_and_leaves_the_scale_alone(gain):
    torch.manual_seed(0)
    cfg = tiny_config(memory=CODE["memory"], keys={**CODE["keys"], "num_reads": 1, "image_shift_gain": gain})
    model = KanervaPlusPlus(cfg)
    torch.manual_seed(0)  # the same seed: the same weights
    free = KanervaPlusPlus(tiny_config(memory=CODE["memory"], keys={**CODE["keys"], "num_reads": 1, "image_shift_gain": 1.0}))
    x = episodes(model)
    with torch.no_grad():
        damped, full = model.encode(x).key_mean, free.encode(x).key_mean
    offset = free.key_offset[: x.shape[1]]
    torch.testing.assert_close(damped[..., 0], full[..., 0])  # the read's scale is still the image's
    torch.testing.assert_close(damped[..., 1:] - offset[..., 1:], gain * (full[..., 1:] - offset[..., 1:]))
    if gain == 0.0:  # every episode reads position t at the same place: its cell's learned offset
        assert torch.equal(damped[..., 1:], offset[..., 1:].expand_as(damped[..., 1:]))
        assert (full[..., 1:] - offset[..., 1:]).abs().max() > 1e-3  # (what the gain removed was not already 0)


def test_a_grid_model_refuses_episodes_longer_than_its_grid():
    model = code_model()
    x = torch.zeros(1, model.cfg.episode_length + 1, *model.cfg.image_shape)
    with pytest.raises(ValueError, match="keys.layout=grid"):
        model.encode(x)


@pytest.mark.parametrize("overrides,field", [
    ({"memory": {"content": "code", "channels": 4}}, "memory.channels"),             # fewer than 2 d_z = 16
    ({"memory": {"content": "map", "write_span": 2.0}}, "memory.write_span"),                    # the map writer ignores it
    ({"memory": {"content": "code", "channels": 16, "write_span": 0.5}}, "memory.write_span"),
    ({"keys": {"layout": "ring"}}, "keys.layout"),
    ({"keys": {"logvar": "fixed"}}, "keys.logvar"),
    ({"keys": {"layout": "centre", "image_shift_gain": 0.5}}, "keys.image_shift_gain"),  # no cells there
    ({"keys": {"layout": "grid", "image_shift_gain": 1.5}}, "keys.image_shift_gain"),
    ({"keys": {"layout": "grid", "image_shift_gain": float("nan")}}, "keys.image_shift_gain"),
])
def test_bad_code_memory_settings_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        tiny_config(**overrides)
    assert err.value.field == field


def test_the_default_model_writes_codes_near_the_centre_and_is_trained_on_the_chain_bound():
    cfg = KanervaConfig()
    assert (cfg.memory.content, cfg.keys.num_reads, cfg.keys.layout, cfg.keys.logvar, cfg.memory.write_span) == (
        "code", 1, "centre", "amortized", 3.0)
    assert (cfg.objective.memory, cfg.encoder.shift_direction) == ("chain", "past")
    assert cfg.memory.channels >= 2 * cfg.latent.dim


@pytest.mark.parametrize("writer", ["none", "dense", "dkm", "km", "vae"])
def test_every_other_writer_is_one_field_away_from_the_defaults(writer):
    """The code memory is the key writer's: `memory.writer=<baseline>` alone builds that model, and an explicit
    content for a writer that never reads it is refused like any setting that would do nothing."""
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(memory={"channels": 16, "writer": writer}))
    x = episodes(model, batch=2)
    assert torch.isfinite(model(x)["loss"])
    with pytest.raises(ConfigError) as err:
        tiny_config(memory={"channels": 16, "writer": writer, "content": "map"})
    assert err.value.field == "memory.content"
