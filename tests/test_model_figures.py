"""Figures, deterministic generation pieces, per-episode bounds, registry naming and the data checks, on a tiny
model in this process (no services). The same code against a real registry: tests/test_registered_models.py."""
import numpy as np
import pytest
import torch
from PIL import Image

from kpp import generate as gen
from kpp import viz
from kpp.evaluate import episode_bounds, evaluate
from kpp.model import KanervaPlusPlus
from pipeline.data.shards.manifest import DataCard
from pipeline.registry import naming
from pipeline.registry.loading import DataMismatch, ModelRef, Registered, RegistryError, check_data, parse_model_uri
from tests.model_helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KanervaPlusPlus(tiny_config()).eval()


@pytest.fixture(scope="module")
def episodes():
    return (torch.rand(5, 6, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.6).float()


def test_key_perturbation_with_zero_noise_reproduces_the_base_samples(model, episodes):
    enc = model.encode(episodes[:2])
    memory = model.write(enc)
    g = torch.Generator().manual_seed(3)
    noise = gen.z_noise(model, 2, 6, g)
    base = gen.decode_at_keys(model, memory, enc.key_mean, noise)
    rows = gen.key_perturbation(model, memory, enc.key_mean, rows=3, std=0.0, generator=g, noise=noise)
    assert rows.shape == (4, 2, 6, 1, 28, 28)
    for r in rows:
        assert torch.equal(r, base)  # exactly: eps = 0 moves no key, and z is the same draw
    moved = gen.key_perturbation(model, memory, enc.key_mean, rows=3, std=0.1, generator=g, noise=noise)
    assert torch.equal(moved[0], base) and all(not torch.equal(r, base) for r in moved[1:])


def test_figures_have_their_grid_shapes_labels_and_content(model, episodes, tmp_path):
    ep = episodes[:1]
    t = ep.shape[1]
    cases = {"prior": (viz.prior_samples_figure(model, ep, rows=2), 1 + 2 * 2),
             "conditional": (viz.conditional_figure(model, ep, samples=2), 3 + 2),
             "perturbation": (viz.key_perturbation_figure(model, ep, rows=3), 1 + 1 + 3),
             "iterative": (viz.iterative_inference_figure(model, ep, rounds=2), 2 + 2),
             "training": (viz.labelled_sample_figure(model, ep, step=7), 9)}
    for name, (fig, rows) in cases.items():
        grid = fig.kpp_grid
        assert (grid["rows"], grid["cols"]) == (rows, t), name
        assert len(grid["row_labels"]) == rows and all(grid["row_labels"]), name
        assert fig._suptitle.get_text(), name
        path = viz.save_figure(fig, tmp_path / f"{name}.png")
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert pixels.shape == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))
        assert pixels.std() > 5, name  # not a constant picture
    memory = viz.memory_keys_figure(model, ep)
    assert memory.kpp_grid == {"channels": 8, "images": t, "reads": 2}  # 7 code channels of 16 and the coverage
    sweep = viz.key_sweep_figure(model, ep, n=4)
    assert (sweep.kpp_grid["panels"], sweep.kpp_grid["rows"], sweep.kpp_grid["cols"]) == (3, 4, 4)
    assert viz.figure_array(memory).dtype == np.uint8 and viz.figure_array(memory).std() > 5
    assert model.training is False
    model.train()
    viz.conditional_figure(model, ep)  # a figure drawn mid-training leaves the model in training mode
    assert model.training
    model.eval()


def test_the_tile_canvas_is_rows_by_columns_of_cells(episodes):
    canvas, h, w = viz.tile([episodes[0], episodes[1, :4]])
    assert canvas.shape == (2 * (28 + 2) + 2, 6 * (28 + 2) + 2, 1) and (h, w) == (28, 28)
    np.testing.assert_array_equal(canvas[2:30, 2:30, 0], episodes[0, 0, 0].numpy())


def test_key_boxes_are_the_read_regions(model):
    # scale logit 0 -> s = (min + max) / 2 of the side, centred: a box of s * side around the middle
    box = viz.key_boxes(model, torch.zeros(3))
    s = (model.cfg.keys.min_scale + model.cfg.keys.max_scale) / 2
    side = model.cfg.memory.width
    np.testing.assert_allclose(box.numpy(), [(1 - s) / 2 * side - 0.5] * 2 + [(1 + s) / 2 * side - 0.5] * 2, atol=1e-5)


def test_episode_bounds_are_evaluate_per_episode_and_split_anywhere(model, episodes):
    whole = evaluate(model, episodes, iwae_samples=3, seed=5)
    per = episode_bounds(model, episodes, iwae_samples=3, seed=5)
    for k in ("neg_elbo", "iwae", "loo_neg_elbo", "loo_iwae", "kl_y"):
        assert per[k].shape == (5,)
        assert abs(per[k].mean().item() - whole[k]) < 1e-3 * abs(whole[k]) + 1e-4, k  # the same draws
    # batches of 2 evaluated in three places give the numbers of the whole set
    full = episode_bounds(model, episodes, iwae_samples=3, seed=5, batch_size=2)
    parts = [episode_bounds(model, episodes[a:b], partner=episodes[b % 5: b % 5 + 1], iwae_samples=3, seed=5,
                            batch_size=2, first_batch=a // 2) for a, b in ((0, 2), (2, 4), (4, 5))]
    for k in full:
        torch.testing.assert_close(torch.cat([p[k] for p in parts]), full[k], rtol=1e-5, atol=1e-4)


def test_registry_names_carry_the_dataset():
    assert naming.model_name("kpp", "digits") == "kpp-digits"
    assert naming.model_name("kpp", "omniglot") == "kpp-omniglot"
    assert naming.model_name("kpp", "digits") != naming.model_name("kpp", "omniglot")
    assert naming.model_name("team", "my data/v2") == "team-my_data_v2"
    with pytest.raises(ValueError, match="tracking.registered_model"):
        naming.model_name("", "digits")
    from pipeline.train import config
    for dataset in ("digits", "omniglot", "binarized_mnist"):
        cfg = config.load(None, [f"data.dataset={dataset}", "tracking.registered_model=kpp"])
        assert naming.registered_name(cfg) == f"kpp-{dataset}"
    assert naming.registered_name(config.load(None, ["tracking.registered_model="])) == ""


def test_model_uris_are_parsed_or_refused():
    assert parse_model_uri("models:/kpp-digits@champion") == ModelRef("kpp-digits", alias="champion")
    assert parse_model_uri("models:/kpp-digits/3") == ModelRef("kpp-digits", version="3")
    for bad in ("kpp-digits@champion", "runs:/abc/model", "models:/kpp-digits", "models:/a/b/c"):
        with pytest.raises(RegistryError, match="not a registered model URI"):
            parse_model_uri(bad)


def _registered(model, **tags):
    base = {naming.DATASET: "digits", naming.IMAGE_SHAPE: "1x28x28", naming.BIT_DEPTH: "1",
            naming.EPISODE_LENGTH: "6"}
    return Registered(ModelRef("kpp-digits", alias="champion"), "kpp-digits", "3", {**base, **tags}, "run", "m-1",
                      "models:/m-1", model=model)


def _card(**fields):
    card = {"dataset": "digits", "image_shape": [1, 28, 28], "bit_depth": 1, "episodes": {"episode_length": 6},
            "splits": {"test": {"num_images": 60}}}
    card.update(fields)
    return DataCard.from_dict(card, "data/dataset.json")


def test_data_that_differs_from_the_version_is_refused_naming_the_field(model):
    reg = _registered(model)
    assert check_data(reg, _card(), "data") == []
    for fields, named in (({"dataset": "omniglot"}, "dataset: the model has digits, the data has omniglot"),
                          ({"image_shape": [1, 32, 32]}, "image shape (CxHxW): the model has 1x28x28, the data has 1x32x32"),
                          ({"bit_depth": 8}, "bit depth: the model has 1, the data has 8"),
                          ({"episodes": {"episode_length": 8}}, "episode length")):
        with pytest.raises(DataMismatch, match=named.replace("(", r"\(").replace(")", r"\)")):
            check_data(reg, _card(**fields), "s3://bucket/data")
    # a version registered before the tags: shape and bit depth from its config, the dataset unchecked (a warning)
    old = Registered(ModelRef("kpp", version="1"), "kpp", "1", {}, "run", "", "", model=model)
    assert "no dataset tag" in check_data(old, _card(dataset="omniglot"), "data")[0]
    with pytest.raises(DataMismatch, match="bit depth"):
        check_data(old, _card(bit_depth=8), "data")


@pytest.mark.parametrize("writer", ["dkm", "km", "vae"])
def test_baselines_get_per_episode_bounds_and_a_reconstruction_grid(writer, episodes):
    torch.manual_seed(0)
    small = {"slots": 8} if writer != "vae" else {}  # the VAE has no matrix memory to size
    base = KanervaPlusPlus(tiny_config(memory={"writer": writer, **small})).eval()
    whole = evaluate(base, episodes, iwae_samples=2, seed=1)
    per = episode_bounds(base, episodes, iwae_samples=2, seed=1)
    for k in ("neg_elbo", "iwae", "loo_neg_elbo") + (("kl_m",) if writer != "vae" else ()):
        assert abs(per[k].mean().item() - whole[k]) < 1e-3 * abs(whole[k]) + 1e-4, k
    fig = viz.labelled_sample_figure(base, episodes[:1])
    assert fig.kpp_grid["row_labels"] == ["episode", "reconstruction"]
    with pytest.raises(ValueError, match="needs the K\\+\\+ memory"):
        viz.memory_keys_figure(base, episodes[:1])
