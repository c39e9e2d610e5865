"""The model's parts do what the paper says: gradients everywhere, a temporal shift that really mixes frames,
reads and writes that are each other's inverse, non-negative KLs, valid likelihoods, weights-only save/load."""
import ast
import io
import pathlib

import pytest
import torch

from kpp import ConfigError, KanervaConfig, KanervaPlusPlus
from kpp.checkpoint import load_model, save_model
from kpp.encoder import ShiftResBlock, temporal_shift
from kpp.likelihood import DiscretizedLogisticMixture
from kpp.config import LikelihoodConfig
from kpp.memory import invert_affine, key_to_affine, place, read
from kpp.model import Noise
from kpp.objective import gaussian_kl, kl_beta, training_loss
from tests.model_helpers import tiny_config


def binary_batch(b=3, t=6, seed=0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((b, t, *shape), 0.3), generator=g)


@pytest.mark.parametrize("writer,content", [("key", "code"), ("key", "map"), ("dense", "code")])
def test_every_parameter_receives_a_gradient(writer, content):
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(memory={"writer": writer, "content": content}))
    if writer == "key" and content == "code":
        # the code memory's prior starts as the code it reads back, its conv correction's output layer at 0: the
        # layers below that get their first gradient once it has moved (one step)
        model(binary_batch())["loss"].backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad()
    model(binary_batch())["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"


def test_temporal_shift_moves_channels_to_neighbouring_frames():
    b, t, c = 2, 5, 16
    x = torch.randn(b * t, c, 3, 3)
    out = temporal_shift(x, t, 0.125).view(b, t, c, 3, 3)
    xv = x.view(b, t, c, 3, 3)
    fold = 2
    assert torch.equal(out[:, :-1, :fold], xv[:, 1:, :fold])  # from the next frame
    assert torch.equal(out[:, 1:, fold : 2 * fold], xv[:, :-1, fold : 2 * fold])  # from the previous frame
    assert torch.all(out[:, -1, :fold] == 0) and torch.all(out[:, 0, fold : 2 * fold] == 0)  # zero at the ends
    assert torch.equal(out[:, :, 2 * fold :], xv[:, :, 2 * fold :])
    # Episodes never leak into each other.
    assert torch.equal(temporal_shift(x, t, 0.125).view(b, t, c, 3, 3)[1], temporal_shift(x[t:], t, 0.125).view(1, t, c, 3, 3)[0])


def test_changing_frame_t_changes_only_its_neighbours_at_depth_one():
    torch.manual_seed(0)
    t = 7
    block = ShiftResBlock(16, 16, 1, 4, 0.125)
    x = torch.randn(t, 16, 5, 5)
    y = block(x, t)
    x2 = x.clone()
    x2[3] += torch.randn(16, 5, 5)
    changed = (block(x2, t) - y).abs().flatten(1).amax(1) > 1e-6
    assert changed.tolist() == [False, False, True, True, True, False, False]


def test_episode_encoder_mixes_frames_across_depth():
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(encoder={"shift_direction": "both"}, objective={"memory": "episode"}))
    x = binary_batch(1)
    e = model.encoder(x)
    x2 = x.clone()
    x2[0, 2] = 1 - x2[0, 2]
    changed = (model.encoder(x2) - e).abs().amax(-1)[0] > 1e-6
    assert changed.all(), "three shift blocks should carry frame 2 to every frame of a 6-frame episode"
    # the online shift (the default) carries it to every later frame and to no earlier one
    online = KanervaPlusPlus(tiny_config())
    changed = (online.encoder(x2) - online.encoder(x)).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False, False, True, True, True, True]
    no_shift = KanervaPlusPlus(tiny_config(encoder={"shift_fraction": 0.0}))
    changed = (no_shift.encoder(x2) - no_shift.encoder(x)).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False, False, True, False, False, False]


def test_read_recovers_a_placed_block_when_grids_align():
    block = torch.randn(1, 1, 3, 4, 4)
    theta = torch.tensor([[[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]]])  # a 4x4 window over the middle of an 8x8 memory
    memory = place(block, theta, 8, 8)[:, 0]
    assert torch.allclose(read(memory, theta, 4), block, atol=1e-5)
    assert memory[:, :, :2].abs().max() == 0 and memory[:, :, 6:].abs().max() == 0  # nothing outside the block
    assert torch.allclose(invert_affine(invert_affine(theta)), theta)


def test_keys_give_local_blocks_within_the_configured_scale():
    y = torch.randn(1000, 3) * 5
    theta = key_to_affine(y, 0.1, 0.5)
    s = theta[:, 0, 0]
    assert torch.all((s >= 0.1) & (s <= 0.5)) and torch.equal(theta[:, 1, 1], s)
    assert torch.all(theta[:, :, 2].abs() <= 1) and torch.all(theta[:, 0, 1] == 0)


def test_kl_terms_are_non_negative_and_match_torch_distributions():
    torch.manual_seed(0)
    mq, lq, mp, lp = (torch.randn(500) for _ in range(4))
    ours = gaussian_kl(mq, lq, mp, lp)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, (0.5 * lq).exp()),
                                            torch.distributions.Normal(mp, (0.5 * lp).exp()))
    assert torch.allclose(ours, ref, atol=1e-5)
    model = KanervaPlusPlus(tiny_config())
    out = model(binary_batch())
    assert out["kl_z"].min() >= 0 and out["kl_y_per_key"].min() >= 0
    assert torch.allclose(out["total"], out["recon"] + out["kl_z"] + out["kl_y"])
    assert out["total"].shape == (3, 6)


def test_discretized_logistic_is_a_distribution_over_256_values():
    torch.manual_seed(0)
    lik = DiscretizedLogisticMixture(LikelihoodConfig(kind="logistic_mixture", num_mixtures=3), channels=1)
    params = torch.randn(1, 9, 1, 1) * 2
    values = torch.arange(256, dtype=torch.float32).view(256, 1, 1, 1) / 255.0
    log_probs = -lik.nll(params.expand(256, -1, -1, -1), values)
    assert torch.logsumexp(log_probs, 0).exp().item() == pytest.approx(1.0, abs=1e-3)


def test_free_bits_and_warmup_shape_only_the_training_loss():
    model = KanervaPlusPlus(tiny_config(objective={"key_free_bits": 5.0}))
    out = model(binary_batch(), beta=0.5)
    kl_y_key = out["kl_y_per_key"].flatten(0, 1).mean(0).clamp(min=5.0).sum()
    expected = out["recon"].mean() + 0.5 * (out["kl_z"].mean() + kl_y_key)
    assert torch.allclose(out["loss"], expected)
    assert torch.allclose(training_loss(out, 1.0, 0.0), out["total"].mean())
    cfg = tiny_config(objective={"kl_warmup_steps": 100, "kl_warmup_start": 0.2}).objective
    assert [kl_beta(s, cfg) for s in (0, 50, 100, 500)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_save_load_gives_bit_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(memory={"writer": "key"}))
    x = binary_batch()
    noise = Noise.draw(model.cfg, 3, 6, generator=torch.Generator().manual_seed(1))
    before = model.terms(x, noise=noise)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    after = loaded.terms(x, noise=noise)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert loaded.cfg == model.cfg
    buf = io.BytesIO()
    torch.save({"format": "something-else"}, buf)
    with pytest.raises(ValueError, match="not a Kanerva"):
        load_model(buf.getvalue())


def test_8bit_model_on_colour_images():
    cfg = tiny_config(bit_depth=8, image_channels=3, image_height=32, image_width=32,
                      likelihood={"kind": "logistic_mixture", "num_mixtures": 2})
    model = KanervaPlusPlus(cfg)
    x = torch.randint(0, 256, (2, 6, 3, 32, 32)).float() / 255
    out = model(x)
    assert out["recon"].shape == (2, 6) and torch.isfinite(out["loss"])


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"read": {"window": 9}}, "read.window"),
        ({"bit_depth": 8}, "likelihood.kind"),
        ({"likelihood": {"kind": "logistic_mixture"}}, "likelihood.kind"),
        ({"episode_length": 0}, "episode_length"),
        ({"memory": {"writer": "lstm"}}, "memory.writer"),
        ({"encoder": {"width": 10}}, "encoder.width"),
        ({"keys": {"max_scale": 1.5}}, "keys.max_scale"),
    ],
)
def test_configs_that_cannot_build_a_model_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        tiny_config(**overrides)
    assert info.value.field == field and field in str(info.value)


def test_unknown_config_field_is_an_error():
    with pytest.raises(ConfigError, match="memory.size"):
        KanervaConfig.from_dict({"memory": {"size": 3}})


def test_wrong_input_shape_is_rejected():
    model = KanervaPlusPlus(tiny_config())
    with pytest.raises(ValueError, match="expected episodes"):
        model(torch.zeros(2, 6, 1, 32, 32))


def test_model_package_is_pure_pytorch():
    for path in (pathlib.Path(__file__).parents[1] / "kpp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"ray", "mlflow", "pipeline", "jobs"}, f"{path} imports {name}"


def test_the_library_never_imports_its_entry_points():
    """pipeline/ and kpp/ are what jobs/ and research/ are built on: an import the other way (as jobs.submit's
    entrypoint check once made) ties the library to its scripts."""
    root = pathlib.Path(__file__).parents[1]
    for path in [*(root / "pipeline").rglob("*.py"), *(root / "kpp").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("jobs", "research")], f"{path} imports {names}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
                assert False, f"{path}: __import__ of a module named at run time"


def test_held_out_images_are_scored_under_a_memory_written_without_them():
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(objective={"held_out": 2, "memory": "episode"}))
    x = binary_batch()
    enc = model.encode(x)
    torch.manual_seed(5)
    memories = model.held_out_memories(x, enc, 2)
    torch.manual_seed(5)
    held = torch.zeros(6, dtype=torch.bool)
    held[torch.randperm(6)[:2]] = True
    own = model.write(enc)
    assert torch.equal(memories[:, ~held], own.unsqueeze(1).expand(-1, 4, -1, -1, -1))
    assert not torch.allclose(memories[:, held], own.unsqueeze(1).expand(-1, 2, -1, -1, -1))
    # Nothing of a held-out image reaches its memory: changing it leaves that memory as it was.
    x2 = x.clone()
    x2[:, held] = 1 - x2[:, held]
    torch.manual_seed(5)
    memories2 = model.held_out_memories(x2, model.encode(x2), 2)
    assert torch.allclose(memories2[:, held], memories[:, held])
    out = model(x)
    assert out["total"].shape == (3, 6) and torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="objective.held_out"):
        tiny_config(objective={"held_out": 6, "memory": "episode"})
