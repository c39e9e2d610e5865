"""The Kanerva Machine baseline (memory.writer=km) and the plain-conv DKM row (writer=dkm, shift_fraction=0): KM's
write at learned addresses is the exact Bayesian posterior and reads its codes back, its KLs are KLs, it trains and
runs every evaluation path; the matrix memory's settings are refused for writers that would ignore them."""
import pytest
import torch

from kpp import ConfigError, KanervaPlusPlus
from kpp.checkpoint import load_model, save_model
from kpp.dkm import LOGVAR_MIN, unpack, write_at
from kpp.evaluate import evaluate
from kpp.model import Noise
from tests.model_helpers import tiny_config
from tests.test_model import binary_batch

K, C = 12, 6
KM = {"writer": "km", "slots": 8, "address_dim": 4}


def prior(seed=0):
    g = torch.Generator().manual_seed(seed)
    r0 = torch.randn(K, C, generator=g, dtype=torch.float64) / K**0.5
    return r0, torch.rand(K, generator=g, dtype=torch.float64) * 0.5 + 0.1


def km_model(seed=0, **memory):
    torch.manual_seed(seed)
    return KanervaPlusPlus(tiny_config(memory={**KM, **memory}))


def test_the_write_at_given_addresses_is_the_exact_bayesian_posterior():
    """Observing z_t = M^T w_t + N(0, s I) under MN(R_0, U_0, I): U = (U_0^-1 + W^T W / s)^-1,
    R = U (U_0^-1 R_0 + W^T Z / s), whatever the order of the T sequential updates."""
    r0, u0 = prior()
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(3, 5, C, generator=g, dtype=torch.float64)
    weights = torch.randn(3, 5, K, generator=g, dtype=torch.float64)
    s = 0.3
    mean, cov, logdet = unpack(write_at(r0, u0, codes, s, weights), C)
    precision = torch.diag(1 / u0) + weights.transpose(1, 2) @ weights / s
    expected_cov = torch.linalg.inv(precision)
    expected_mean = expected_cov @ (r0 / u0.unsqueeze(-1) + weights.transpose(1, 2) @ codes / s)
    assert torch.allclose(cov, expected_cov, atol=1e-10) and torch.allclose(mean, expected_mean, atol=1e-10)
    assert torch.allclose(logdet, torch.linalg.slogdet(expected_cov).logabsdet, atol=1e-8)
    backwards = unpack(write_at(r0, u0, codes.flip(1), s, weights.flip(1)), C)[0]
    assert torch.allclose(backwards, mean, atol=1e-10)


def test_each_written_code_is_read_back_at_its_own_address():
    r0, u0 = prior(2)
    g = torch.Generator().manual_seed(3)
    codes = torch.randn(2, 4, C, generator=g, dtype=torch.float64)  # 4 codes, 12 slots: room for all
    weights = torch.randn(2, 4, K, generator=g, dtype=torch.float64)
    for noise, tol in ((1e-4, 1e-2), (1e-8, 1e-6)):
        mean = unpack(write_at(r0, u0, codes, noise, weights), C)[0]
        back = weights @ mean  # w_t^T M for every t
        assert torch.allclose(back, codes, atol=tol), noise


def test_the_model_s_memory_reads_back_through_its_learned_addresses():
    model = km_model()
    mem = model.memory
    with torch.no_grad():
        mem.obs_logvar.fill_(LOGVAR_MIN)  # the smallest observation noise the model allows
    g = torch.Generator().manual_seed(4)
    codes, y = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 4, generator=g)  # 3 codes, 8 slots
    memory = mem.write(codes, y)
    read, spread = mem.read(memory, mem.weights(y))
    assert (read - codes).abs().max() < 0.05 * codes.abs().max()
    assert spread.max() < 0.01  # those directions of the memory are now nearly certain


def test_memory_kl_is_zero_at_the_prior_and_positive_after_a_write():
    mem = km_model().memory
    assert mem.kl(mem.empty(2)).abs().max() < 1e-4
    nothing = mem.write(torch.zeros(2, 0, 8), torch.zeros(2, 0, 4))  # an empty episode: the posterior is the prior
    assert torch.allclose(nothing, mem.empty(2), atol=1e-6) and mem.kl(nothing).abs().max() < 1e-4
    written = mem.write(torch.randn(2, 5, 8), torch.randn(2, 5, 4))
    assert torch.all(mem.kl(written) > 0)


def test_address_kl_is_zero_when_q_y_is_the_prior():
    model = km_model()
    with torch.no_grad():  # q(y_t | x_t) = N(0, I) for every image
        model.memory.address_posterior.weight.zero_()
        model.memory.address_posterior.bias.zero_()
    out = model(binary_batch())
    assert out["kl_y_per_key"].shape == (3, 6, 1) and out["kl_y"].abs().max() == 0
    # ... and every image was written at w = A 0 + b = 0 (b starts at 0): nothing written, q(M) = p(M)
    assert out["kl_z"].min() >= 0 and out["kl_m"].abs().max() < 1e-4


def test_km_shares_the_interface_and_every_parameter_learns():
    model = km_model()
    assert model.cfg.kind == "km" and model.cfg.key_terms == 1
    x = binary_batch()
    noise = Noise.draw(model.cfg, 3, 6, generator=torch.Generator().manual_seed(0))
    assert noise.key.shape == (3, 6, 4)  # one addressing latent y of S = 4 numbers per image
    enc = model.encode(x)
    memory = model.write(enc)
    assert memory.shape == (3, 8, 8 + 8 + 1)
    out = model.terms(x, memory=memory, noise=noise, enc=enc)
    assert torch.allclose(out["total"], out["recon"] + out["kl_z"] + out["kl_y"] + out["kl_m"])
    assert torch.allclose(out["kl_m"].sum(1), model.memory.kl(memory), rtol=1e-5)  # T images x KL / T
    loss = model(x)["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing
    assert not any(n.startswith(("key_posterior", "writer", "z_prior")) for n, _ in model.named_parameters())


def test_km_trains_on_random_binary_episodes_and_its_loss_falls():
    model = km_model()
    x = binary_batch(4, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(x, beta=1.0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 30, losses  # measured: 594 -> 478 nats/image


def test_km_evaluation_iwae_leave_one_out_and_save_load(tmp_path):
    model = km_model()
    x = binary_batch(4, seed=3)
    r = evaluate(model, x, iwae_samples=16, seed=5, batch_size=3)
    assert r == evaluate(model, x, iwae_samples=16, seed=5, batch_size=3)
    assert r["iwae"] < r["neg_elbo"] and r["loo_iwae"] < r["loo_neg_elbo"]
    assert r["kl_m"] > 0 and r["swap_gap"] != 0.0 and set(k for k in r if k.startswith("kl_y_key")) == {"kl_y_key0"}
    # image t's leave-one-out memory knows nothing of x_t
    loo = model.leave_one_out_memories(x)
    changed = x.clone()
    changed[:, 2] = 1 - changed[:, 2]
    assert torch.equal(model.leave_one_out_memories(changed)[:, 2], loo[:, 2])
    assert not torch.equal(model.leave_one_out_memories(changed)[:, 0], loo[:, 0])
    save_model(model, tmp_path / "km.pt")
    noise = Noise.draw(model.cfg, 4, 6, generator=torch.Generator().manual_seed(1))
    loaded = load_model(tmp_path / "km.pt")
    assert torch.equal(model.terms(x, noise=noise)["total"], loaded.terms(x, noise=noise)["total"])


@pytest.mark.parametrize("writer", ["dkm", "km"])
def test_with_shift_fraction_0_an_image_is_encoded_alone(writer):
    """The plain-conv rows (DKM, KM): with encoder.shift_fraction=0 an image's embedding is what it is when the
    image is encoded by itself, whatever else the episode holds (the TSM encoder mixes the episode)."""
    torch.manual_seed(0)
    plain = KanervaPlusPlus(tiny_config(memory={"writer": writer}, encoder={"shift_fraction": 0.0}))
    tsm = KanervaPlusPlus(tiny_config(memory={"writer": writer}))
    x = binary_batch(2)
    for model, alone in ((plain, True), (tsm, False)):
        e = model.encoder(x)
        single = torch.cat([model.encoder(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)
        assert torch.allclose(e, single, atol=1e-5) == alone
    out = plain(x)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("field, value, writers", [
    ("slots", 8, ["key", "dense", "none", "vae"]),
    ("address_reg", 0.2, ["key", "dense", "none", "km", "vae"]),
    ("address_dim", 8, ["key", "dense", "none", "dkm", "vae"]),
])
def test_a_matrix_memory_setting_is_refused_for_a_writer_that_ignores_it(field, value, writers):
    for writer in writers:
        with pytest.raises(ConfigError) as info:
            tiny_config(memory={"writer": writer, field: value})
        assert info.value.field == f"memory.{field}" and "only used by writer=" in str(info.value), writer
        assert f"not writer={writer!r}" in str(info.value)
    # the default value is no setting: every writer takes it (a saved config lists every field)
    for writer in writers:
        tiny_config(memory={"writer": writer, field: getattr(tiny_config().memory, field)})


def test_the_writers_that_use_the_matrix_memory_settings_take_them():
    assert tiny_config(memory={"writer": "dkm", "slots": 8, "address_reg": 0.2}).memory.slots == 8
    assert tiny_config(memory={"writer": "km", "slots": 8, "address_dim": 3}).memory.address_dim == 3
    with pytest.raises(ConfigError, match="memory.address_dim"):
        tiny_config(memory={"writer": "km", "address_dim": 0})
    with pytest.raises(ConfigError, match="memory.writer") as info:
        tiny_config(memory={"writer": "kanerva"})
    assert "'km'" in str(info.value) and "'dkm'" in str(info.value)
