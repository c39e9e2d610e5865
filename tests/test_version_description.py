"""What a registered version says of itself in words (naming.version_description), beside its tags."""

import pytest

from pipeline.registry import naming
from pipeline.train import config


def test_a_version_description_names_data_training_scores_and_provenance():
    cfg = config.load(None, ["name=digits-a", "data.dataset=binarized_mnist", "train.max_steps=3000", "seed=7",
                             "scaling.num_workers=2", "data.test_episodes=32"])
    text = naming.version_description(cfg, {"test/chain_neg_elbo": 121.5, "test/loo_neg_elbo": 130.25,
                                            "test/neg_elbo": 107.334, "test/iwae": 97.091, "test/swap_gap": 16.21},
                                      "run123", {naming.GIT_COMMIT: "0123456789abcdef0123"})
    for part in ("Kanerva++ (writer=key", "binarized_mnist 1x28x28", "16-image episodes", "3000 steps x 2 worker(s)",
                 "seed 7", "chain bound 121.50, leave-one-out bound 130.25, memory-conditional bound 107.33",
                 "memory-conditional IWAE 97.09", "swap gap +16.21 nats/image on 32 test episodes",
                 "Job 'digits-a'", "MLflow run run123", "commit 0123456789ab."):
        assert part in text, (part, text)
    # the registered model says which bound picks its champion
    assert "compared by their test chain -ELBO" in naming.model_description(cfg)
    assert "tracking.champion_metric=neg_elbo" in naming.model_description(
        config.load(None, ["tracking.champion_metric=neg_elbo"]))


def test_a_version_without_test_bounds_says_so_and_a_baseline_says_which():
    cfg = config.load(None, ["model.memory.writer=vae", "model.bit_depth=8",
                             "model.likelihood.kind=logistic_mixture"])
    text = naming.version_description(cfg, {}, "r", {})
    assert text.startswith("VAE baseline on ") and "No test bound recorded" in text and "commit unknown" in text
    assert "bits/dim" in naming.model_description(cfg)


@pytest.mark.parametrize("writer, label", [("key", "Kanerva++ (writer=key, code memory, 1 read)"),
                                           ("none", "Kanerva++ (writer=none, 1 read)"), ("dkm", "DKM baseline"),
                                           ("km", "Kanerva Machine baseline"), ("vae", "VAE baseline")])
def test_every_model_kind_is_named_in_its_description(writer, label):
    """A KM version failed to register (KeyError 'km') when the writer was added without a label."""
    cfg = config.load(None, [f"model.memory.writer={writer}"])
    assert naming.version_description(cfg, {}, "r", {}).startswith(f"{label} on digits ")
