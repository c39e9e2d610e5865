"""Training on real data does what it should: a few hundred CPU steps on 512 real binarized-MNIST images bring the
test bound far below its start, the memory is used, and a seeded run is reproducible bit for bit."""
import pytest
import torch

from kpp import KanervaPlusPlus
from kpp.data import to_model_input
from kpp.evaluate import evaluate
from pipeline.data.episodes import class_episodes, fixed_episodes
from pipeline.train.local import local_job, train_local
from pipeline.data.sources import load_split
from tests.model_helpers import tiny_config

# each trains for real for a few hundred steps (make test-unit skips them)
pytestmark = pytest.mark.slow

CONFIG = dict(
    episode_length=8,
    encoder={"width": 16, "groups": 4, "embedding_dim": 64},
    memory={"channels": 32, "height": 16, "width": 16, "writer": "key"},
    read={"window": 8},
    latent={"dim": 16, "prior_width": 32},
    decoder={"width": 16, "groups": 4},
)


@pytest.fixture(scope="module")
def mnist(shared_data):
    train = load_split("binarized_mnist", str(shared_data / "binarized_mnist"), "train")
    test = load_split("binarized_mnist", str(shared_data / "binarized_mnist"), "test")
    images = to_model_input(train.images[:512], 1)
    test_x = to_model_input(test.images, 1)[torch.from_numpy(fixed_episodes(len(test), 8, 1234))[:16]]
    return images, test_x


def test_few_hundred_steps_on_real_binarized_mnist_lower_the_test_bound(mnist):
    images, test_x = mnist
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(**CONFIG))
    before = evaluate(model, test_x, iwae_samples=8, leave_one_out=False)
    train_local(model, images, local_job(["train.max_steps=300", "data.batch_episodes=8", "train.lr=2e-3",
                                                "train.warmup_steps=20", "train.log_every=100"]))
    after = evaluate(model, test_x, iwae_samples=8)
    print("before", before, "\nafter", after)
    # Measured here (seed 0, 2 busy cores): 498.8 -> 156.7 nats/image (IWAE 152.7); swap gap +0.03 (memory unused).
    assert before["neg_elbo"] > 450
    assert after["neg_elbo"] < 0.35 * before["neg_elbo"]
    assert after["iwae"] < after["neg_elbo"]
    # Whether the memory is used on i.i.d. episodes after so short a run is an experiment (it takes ~1,000 steps
    # of the full model: docs/memory-experiments.md); the next test checks the memory on episodes that share a class.


def test_default_recipe_uses_the_memory_on_episodes_of_one_class():
    """A change that disconnects the memory (the prior ignoring its reads, writes that never reach the read, keys
    collapsing) fails here: on real digits in episodes of one class, 300 steps of the default objective recipe
    (KL warm-up over 40% of the run, key free bits 0.5) must leave a clearly positive paired swap gap."""
    train, test = load_split("digits", None, "train"), load_split("digits", None, "test")
    images = to_model_input(train.images, 1)
    test_x = to_model_input(test.images, 1)[torch.from_numpy(class_episodes(test.labels, 8, 1234))]
    torch.manual_seed(0)
    model = KanervaPlusPlus(tiny_config(**CONFIG, objective={"kl_warmup_steps": 120}))
    assert model.cfg.objective.key_free_bits == 0.5 and model.cfg.memory.writer == "key"  # the defaults
    train_local(model, images, local_job(["train.max_steps=300", "data.batch_episodes=8", "train.lr=2e-3",
                                                "train.warmup_steps=20", "train.log_every=100",
                                                "data.episodes=class"]), labels=train.labels)
    result = evaluate(model, test_x, iwae_samples=4)
    print(result)
    # Measured here: swap gap +3.74 nats/image (-ELBO 141.8, LOO 142.1) after 300 steps (+8.56 with the splat
    # write); a memory that is ignored gives 0.00-0.05 on these paired draws.
    assert result["swap_gap"] > 1.0


def test_seeded_training_is_reproducible(mnist):
    images, _ = mnist
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = KanervaPlusPlus(tiny_config(**CONFIG))
        history = train_local(model, images, local_job(["train.max_steps=6", "data.batch_episodes=4",
                                                                "train.warmup_steps=2", "train.log_every=3", "seed=7"]))
        runs.append((history, [p.detach().clone() for p in model.parameters()]))
    (h1, p1), (h2, p2) = runs
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in h1] == [{k: v for k, v in r.items() if k != "seconds"} for r in h2]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
