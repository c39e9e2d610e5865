"""Typed configuration of the Kanerva++ model: one dataclass per component, composed into `KanervaConfig`.

Every choice the paper leaves open (marked "choice" in the design doc) is a field here, so a sweep can search it.
`KanervaConfig.validate()` rejects a config that cannot build a model, naming the field, before any training.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, help: str) -> Any:
    """A field with its help text (what `python -m jobs.train --help` prints for model.*)."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A config value that cannot build a model. `field` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.what = message

    def __reduce__(self):  # pickled across processes (a Ray worker's error reaches the driver): rebuilt from its parts
        return (ConfigError, (self.field, self.what))


@dataclass(kw_only=True)
class EncoderConfig:
    """TSM ResNet applied to every image of the episode, then a 2-layer MLP to the embedding E [B, T, F]."""

    width: int = _f(32, "channels of the first stage; doubled at each of the two downsampling stages")
    # Stride of the stem conv. 2 runs the first stage at half resolution (14x14 for MNIST): the full-resolution
    # stage was over half of the step's conv time on CPU (docs/memory-experiments.md, speed).
    stem_stride: int = _f(2, "stride of the stem conv: 2 runs the first stage at half resolution")
    blocks_per_stage: int = _f(1, "residual blocks per stage (3 stages)")
    groups: int = _f(8, "GroupNorm groups (the authors use GroupNorm, not BatchNorm)")
    shift_fraction: float = _f(0.125, "fraction of channels shifted each way along the episode (TSM: 1/8)")
    # "both" is TSM as published: frame t takes channels from t-1 and t+1, so every embedding sees its neighbours.
    # "past" is TSM's online variant: frame t takes channels from t-1 only, so E_t is a function of x_1..x_t and
    # the memory written from E_1..E_{t-1} holds nothing of x_t or later images: the chain bound then costs one pass
    # (kpp/model.py: chain_memories) and can be trained (objective.memory=chain).
    shift_direction: Literal["past", "both"] = _f("past", "temporal shift from the previous frame only (past: online TSM, the encoder never looks ahead) or from both neighbours (both: TSM as published)")
    embedding_dim: int = _f(256, "F: embedding size of each image (input of the keys, the writer and q(z))")
    # How the last feature map becomes one vector per image. "mean" is ResNet's global average pooling (the
    # authors'); on 28x28 images "flatten" keeps where the strokes are and trained much faster here
    # (deterministic autoencoder after 150 steps: 145 vs 200 nats/image).
    pooling: Literal["flatten", "mean"] = _f("flatten", "how the last feature map becomes one vector per image")


@dataclass(kw_only=True)
class MemoryConfig:
    """The deterministic 2-D memory M [B, C_m, H_m, W_m] written from the episode (a point mass, no KL)."""

    channels: int = _f(64, "C_m: memory channels (memory.content=code: at least 2 x latent.dim)")
    height: int = _f(16, "H_m: memory height")
    width: int = _f(16, "W_m: memory width")
    # "key": each image writes a block at its own posterior key means (the inverse of the read), summed over the
    # episode on a learned base map. "dense": each image writes a memory-sized map from its embedding, summed,
    # then a conv stack. "none": an ablation, M is a learned map the episode does not write to (a VAE with a
    # learned, key-conditioned prior). See docs/memory-experiments.md for what each does to the memory's use.
    # The baselines are two more values of this switch rather than another model class: every path that builds,
    # trains, saves, registers and evaluates a model builds KanervaPlusPlus from this config, so a baseline is a
    # one-field override everywhere (the memory is what differs; encoder, decoder and likelihood are shared).
    # "dkm": the Dynamic Kanerva Machine's matrix-normal memory and least-squares addressing in place of the 2-D
    # memory and its keys (the paper's "DKM w/ TSM", kpp/dkm.py; with encoder.shift_fraction=0 the plain-conv
    # "DKM"). "km": the Kanerva Machine (Wu, Wayne, Graves, Lillicrap 2018a), the same matrix-normal memory with
    # learned addresses from a latent y_t per image. "vae": no memory, z ~ N(0, I): the control every memory must beat.
    writer: Literal["key", "dense", "none", "dkm", "km", "vae"] = _f("key", "how the episode writes M: at its key means, densely, not at all (ablation); or a baseline: dkm (Dynamic Kanerva Machine), km (Kanerva Machine), vae (no memory, N(0, I) prior)")
    # How the key writer places a block (kpp/memory.py: place). "sample": the block resampled at the memory's
    # pixels (a read at the write's key returns it where the read's region spans at least `window` memory pixels,
    # and little of it at the smallest scales). "splat": the read's transpose normalised by coverage, so the read
    # returns the block at every scale. Measured at 2,280 steps, sample 86.06 vs splat 89.15 nats/image (swap gap
    # +112 vs +54): the consistent write learned to use the memory more slowly (docs/memory-experiments.md).
    placement: Literal["sample", "splat"] = _f("sample", "how the key writer places a block: resampled at the memory's pixels, or the read's transpose")
    # What the key writer writes. "map": a learned C_m x w x w block of the image's embedding, which the prior's conv
    # net must learn to read. "code" (the default): the image's code, one C_m vector over the whole block, started
    # as the mean and log-variance of its posterior q(z | X); the memory also carries how much of the writes
    # covers each pixel, and a read is divided by its coverage, so it returns the mean code of the writes it
    # lands on. Under the chain objective (the default) x_t's memory holds only the earlier images' codes: the
    # prior starts as N(their mean code, I). Under the paper's objective with keys.layout=grid and
    # keys.logvar=shared at -4 (the default until the chain bound) each image reads back its own code and
    # p(z | M_hat) = q(z | X) from step 0: what the memory-conditional bound allows (a copy that predicts
    # nothing: leave-one-out 4,400+ nats/image; docs/memory-experiments.md). Needs channels >= 2 d_z.
    content: Literal["map", "code"] = _f("code", "what the key writer writes: a learned block of the embedding (map), or the image's posterior code, read back by the prior from step 0 (code)")
    # The code writer's write covers write_span times the region of the read at the same key (same centre), so a
    # read whose key noise moves it off centre still lands on the write alone.
    # 3 (the default): a write covers most of a 16 x 16 memory, so a read anywhere near the centre lands on the
    # earlier images' writes and returns the mean of their codes (divided by their coverage), weighted towards
    # the writes whose keys lie nearest its own: what a prior for the next member of the episode needs (one-class
    # episodes, 1,000 steps: chain bound 95.75 against 97.15 without memory, docs/results.md).
    write_span: float = _f(3.0, "memory.content=code: an image's write covers this many times the side of its read's region")
    # The matrix-normal memory of DKM and KM (writer=dkm, km) is K_m x d_z (the authors' DKM: 32 x 100). Set for
    # another writer these do nothing, so validate() refuses them there (MATRIX_MEMORY_FIELDS).
    slots: int = _f(32, "writer=dkm or km: K_m, rows of the matrix-normal memory (its columns are the latent dim)")
    address_reg: float = _f(0.1, "writer=dkm: lambda of the least-squares addressing w = (M M^T + lambda I)^-1 M z")
    # KM's address w_t = A y_t + b from a latent y_t in R^S, p(y) = N(0, I). S is our choice (no public source we
    # could read gives the KM paper's): K_m, as many address dimensions as slots.
    address_dim: int = _f(32, "writer=km: S, size of the addressing latent y_t (the address is w_t = A y_t + b)")


BASELINES = ("dkm", "km", "vae")  # memory.writer values that are another model, not a K++ writer (cfg.kind)
# The matrix-normal memory's settings and the writers that use them: set for another writer they would silently do
# nothing (a sweep over them would search nothing), so validate() refuses that.
MATRIX_MEMORY_FIELDS = {"slots": ("dkm", "km"), "address_reg": ("dkm",), "address_dim": ("km",)}
# The settings only some writers read, by the same rule: another writer leaves them at their defaults. (memory.content
# is the key writer's: the default code memory is K++'s, and a baseline's `memory.writer=vae` alone must work.)
WRITER_FIELDS = {**MATRIX_MEMORY_FIELDS, "content": ("key",)}


@dataclass(kw_only=True)
class KeyConfig:
    """Keys y in R^3 per image and read: (scale, shift_x, shift_y) of an affine read grid. Prior N(0, I)."""

    # 1 with the code memory: one read per image returns its whole code; a second read of the code cost ~10 nats of
    # KL_y at 250 steps (docs/memory-experiments.md). With the map memory 2 (82.89 vs 86.71 for 4 at 2,280 steps):
    # with 4, one key carried the address and the rest sat at the free-bits floor.
    num_reads: int = _f(1, "K: reads (keys) per image")
    min_scale: float = _f(0.1, "the read covers between min_scale and max_scale of the memory side (choice)")
    max_scale: float = _f(0.5, "upper bound of the read scale: a read is a local block, never the whole memory")
    # Initial log-variance of q(y | X). Below 0 the first reads land near the writes (which sit at the key means),
    # so the memory can pay for its key KL before the keys collapse onto the prior (see docs/memory-experiments.md).
    # 0 (the default): the keys start at the prior and pay KL_y only for what their precision buys in the chain
    # bound; -4 (the code memory's setting under the paper's objective) starts them sharp at ~4.5 nats per key.
    init_logvar: float = _f(0.0, "initial log-variance of the key posterior q(y | X)")
    # Scales the initial weights of the key means. At the default init every image's key mean is ~0, so all images
    # write to (and read from) the same place and each read returns a superposition of the whole episode; a larger
    # gain spreads the first writes over the memory.
    init_mean_gain: float = _f(1.0, "scale of the initial weights of the key means (spreads the first writes)")
    # "centre": every key mean starts near 0, so at step 0 the whole episode writes to (and reads from) one place.
    # "grid": a learned offset per episode position and read is added to the key means, started at the centre of
    # its own cell of a grid that tiles the memory, the read's scale at the cell's (divided by memory.write_span):
    # every image writes and reads at an address of its own from step 0. p(y) stays N(0, I), so the offsets are
    # paid for in KL_y like any key. Under the chain objective (the default) an image's own cell is empty in the
    # memory it is scored under, so "grid" reads return the base map: "centre" lets an image's key find where the
    # earlier images of its episode wrote. "grid" is the code memory of the paper's objective (the copy).
    layout: Literal["centre", "grid"] = _f("centre", "where the keys start: all near the centre, or each episode position at its own cell of a grid over the memory")
    # With layout=grid the key mean is (image part) + (position's offset). Nothing stops the image part of the
    # shifts from growing and moving an episode's reads onto each other (seed 2 of the 1,000-step code-memory runs:
    # read centres 0.12 of the half-width apart, KL_z 12.6 against 4.0; docs/memory-experiments.md). This weight
    # scales the image part of the two shifts: 0 puts each read at its position's cell (a learned offset, still
    # paid for in KL_y); the scale stays the image's. At 0: 67.28 / 66.51 / 69.28 nats/image at 1,000 steps on
    # three seeds, against 76.16 / 78.03 / 97.24 at 1.
    image_shift_gain: float = _f(0.0, "keys.layout=grid: weight of the image-dependent part of the key's shifts (0: a read's position comes from the episode position alone)")
    # "amortized": log-variance from the image's embedding, as the mean. "shared": one learned log-variance per read
    # and coordinate. Under Adam an amortised log-variance moves by ~lr x (its 256 inputs) per step and the key
    # KL's consistent gradient widens sharp keys back to the prior within ~50 steps, before any read pays; a
    # shared one moves by ~lr per step (docs/memory-experiments.md).
    logvar: Literal["amortized", "shared"] = _f("amortized", "the key posterior's log-variance: from the image (amortized), or one learned value per read and coordinate (shared)")


@dataclass(kw_only=True)
class ReadConfig:
    """Spatial-transformer read: each key reads a window x window block of M by bilinear sampling."""

    window: int = _f(8, "w: each read returns a w x w block of the memory")


@dataclass(kw_only=True)
class LatentConfig:
    """Z: learned prior p(z | M_hat, y) from the read blocks, amortised posterior q(z | X) from E."""

    dim: int = _f(32, "d_z: size of the latent Z")
    prior_width: int = _f(64, "channels of the conv net over the concatenated blocks")
    # The paper's prior is a function of the read blocks M_hat only. Feeding the keys in as well lets them act as
    # extra latent variables that bypass the memory (measured: KL_y 19 nats, swap gap ~0), so it is off by default.
    prior_sees_keys: bool = _f(False, "feed the keys to the prior besides the read blocks (off: the paper's prior)")


@dataclass(kw_only=True)
class DecoderConfig:
    width: int = _f(32, "channels of the last transposed-conv stage (the first has 2x)")
    groups: int = _f(8, "GroupNorm groups")


@dataclass(kw_only=True)
class LikelihoodConfig:
    # "bernoulli" for binarized images (bit_depth 1); "logistic_mixture" (discretized, 256 bins) for 8-bit.
    kind: Literal["bernoulli", "logistic_mixture"] = _f("bernoulli", "bernoulli for binarized images, logistic_mixture (256 bins) for 8-bit")
    num_mixtures: int = _f(5, "logistic_mixture only")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Training-only shaping of the ELBO. The reported bounds never include warm-up or free bits."""

    # The defaults are the measured recipe that makes the memory carry the episode (docs/memory-experiments.md):
    # without warm-up and free bits the keys fall onto the prior and the reads land at random places.
    kl_warmup_steps: int = _f(900, "beta rises linearly from kl_warmup_start to 1 over these steps (0: beta = 1)")
    kl_warmup_start: float = _f(0.0, "beta at step 0 when kl_warmup_steps > 0")
    key_free_bits: float = _f(0.5, "nats per key read: KL_y below this is not penalised (batch mean, per key)")
    # Images per episode scored under a memory written from the rest of the episode only (re-encoded without
    # them, so nothing of x_t reaches it) instead of the memory they were written into. 0 is the paper's
    # objective. On episodes that share structure this trains the memory to predict the episode's unseen members
    # (the leave-one-out bound); it costs one more encoder pass per step.
    held_out: int = _f(0, "images per episode scored under a memory written without them (0: the paper's objective)")
    # The memory enters the ELBO only through the prior p(z | reads), which matters only as far as KL_z is paid
    # for: while the warm-up discounts KL_z, z can carry the image without the memory. False keeps KL_z at full
    # weight from step 0 and warms up only the key KL (docs/memory-experiments.md, the pick-up).
    kl_z_warmup: bool = _f(True, "apply the KL warm-up to KL_z as well as to the key KL (false: KL_z at weight 1 from step 0)")
    # Which memory each image is scored under in training. "episode" is the paper's objective: the memory written
    # from the whole episode, x_t included, which any deterministic memory can drive down by carrying x_t to its
    # own prior (a copy predicts nothing). "chain": x_t under the memory of x_1..x_{t-1} only (t = 1: the empty
    # memory), a proper bound on -ln p(X) / T by the chain rule: the memory pays only for what it predicts.
    # Needs an encoder that does not look ahead (encoder.shift_direction=past). The baselines' objectives (VAE,
    # DKM, KM) are proper bounds already; this field changes nothing for them.
    memory: Literal["chain", "episode"] = _f("chain", "memory each image is scored under in training: written from the images before it (chain, a proper bound) or from the whole episode, itself included (episode: the paper's objective)")


@dataclass(kw_only=True)
class KanervaConfig:
    """The whole model: the images it is trained on, then one section per component, in the order of the step
    (encode, write, address, read, infer z, decode, score). `validate()` checks them together."""

    image_channels: int = _f(1, "C of the images (1: MNIST-family, 3: CIFAR10)")
    image_height: int = _f(28, "H of the images")
    image_width: int = _f(28, "W of the images")
    bit_depth: int = _f(1, "1: binarized {0,1}; 8: 0..255")
    episode_length: int = _f(16, "T (the authors use 32)")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    keys: KeyConfig = field(default_factory=KeyConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.image_height, self.image_width)

    @property
    def kind(self) -> str:
        """"kpp" (the 2-D memory with keys: writers key, dense, none), "dkm", "km" or "vae" (the baselines)."""
        return self.memory.writer if self.memory.writer in BASELINES else "kpp"

    @property
    def encoder_is_causal(self) -> bool:
        """Whether E_t depends on x_1..x_t only (no temporal shift from the next frame)."""
        return self.encoder.shift_direction == "past" or self.encoder.shift_fraction == 0.0

    @property
    def key_terms(self) -> int:
        """How many per-key KL terms an image has (kl_y_per_key's last dim): K reads for K++, one addressing
        vector for DKM (w) and KM (y), none for the VAE."""
        return {"kpp": self.keys.num_reads, "dkm": 1, "km": 1, "vae": 0}[self.kind]

    @property
    def unit(self) -> str:
        """The unit the paper reports for this kind of data."""
        return "nats/image" if self.bit_depth == 1 else "bits/dim"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KanervaConfig":
        """Build from a nested dict (e.g. parsed YAML/JSON). Unknown keys are errors, not silently dropped."""
        return _from_dict(cls, data, prefix="")

    def validate(self) -> "KanervaConfig":
        _check_types(self, prefix="")  # also every Literal field (memory.writer, ...): one of its values
        _check_positive(self, ["image_channels", "image_height", "image_width", "episode_length"])
        if self.bit_depth not in (1, 8):
            raise ConfigError("bit_depth", f"must be 1 (binarized) or 8, got {self.bit_depth}")
        if min(self.image_height, self.image_width) < 8:
            raise ConfigError("image_height", "images must be at least 8x8 for the 3-stage encoder")
        e = self.encoder
        _check_positive(e, ["width", "blocks_per_stage", "groups", "embedding_dim", "stem_stride"], "encoder")
        if e.stem_stride > 2:
            raise ConfigError("encoder.stem_stride", f"must be 1 or 2, got {e.stem_stride}")
        if e.width % e.groups:
            raise ConfigError("encoder.width", f"{e.width} is not divisible by encoder.groups={e.groups}")
        if not 0.0 <= e.shift_fraction <= 0.5:
            raise ConfigError("encoder.shift_fraction", f"must be in [0, 0.5], got {e.shift_fraction}")
        m = self.memory
        _check_positive(m, ["channels", "height", "width"], "memory")
        _check_positive(m, ["slots", "address_dim"], "memory")
        if not (m.address_reg > 0 and math.isfinite(m.address_reg)):
            raise ConfigError("memory.address_reg", f"must be a finite number > 0, got {m.address_reg}")
        default = MemoryConfig()
        for name, writers in WRITER_FIELDS.items():
            if m.writer not in writers and getattr(m, name) != getattr(default, name):
                raise ConfigError(f"memory.{name}", f"only used by writer={' or '.join(writers)}, not "
                                  f"writer={m.writer!r}: leave it at its default ({getattr(default, name)})")
        if m.content == "code" and m.writer == "key":
            if m.channels < 2 * self.latent.dim:
                raise ConfigError("memory.channels", f"memory.content=code writes the posterior's mean and log-variance: "
                                  f"needs at least 2 x latent.dim = {2 * self.latent.dim} channels, got {m.channels}")
        if not (math.isfinite(m.write_span) and m.write_span >= 1.0):
            raise ConfigError("memory.write_span", f"must be a finite number >= 1, got {m.write_span}")
        if m.write_span != default.write_span and not (m.content == "code" and m.writer == "key"):
            raise ConfigError("memory.write_span", "only the code writer (memory.content=code) uses it: leave it at "
                              f"its default ({default.write_span})")
        k = self.keys
        _check_positive(k, ["num_reads"], "keys")
        if not 0.0 < k.min_scale <= 1.0:
            raise ConfigError("keys.min_scale", f"must be in (0, 1] (a fraction of the memory side), got {k.min_scale}")
        if not 0.0 < k.max_scale <= 1.0:
            raise ConfigError("keys.max_scale", f"must be in (0, 1] (a fraction of the memory side), got {k.max_scale}")
        if k.min_scale > k.max_scale:
            raise ConfigError("keys.min_scale", f"{k.min_scale} is above keys.max_scale={k.max_scale}")
        # An image's K reads, each at least min_scale of the side, cannot all be told apart in the memory when their
        # smallest footprints already cover it more than once.
        if k.num_reads * k.min_scale**2 > 1.0:
            raise ConfigError("keys.num_reads", f"{k.num_reads} reads of at least {k.min_scale} of the memory side cover "
                              f"it {k.num_reads * k.min_scale**2:.2f} times over: lower keys.num_reads or keys.min_scale")
        if not (math.isfinite(k.image_shift_gain) and 0.0 <= k.image_shift_gain <= 1.0):
            raise ConfigError("keys.image_shift_gain", f"must be in [0, 1], got {k.image_shift_gain}")
        default_gain = KeyConfig().image_shift_gain
        if k.layout != "grid" and k.image_shift_gain != default_gain:
            raise ConfigError("keys.image_shift_gain", "only keys.layout=grid has a position part to keep: leave it at "
                              f"its default ({default_gain})")
        w = self.read.window
        if w <= 0:
            raise ConfigError("read.window", f"must be positive, got {w}")
        if w > m.height or w > m.width:
            raise ConfigError("read.window", f"a {w}x{w} read window does not fit a {m.height}x{m.width} memory")
        _check_positive(self.latent, ["dim", "prior_width"], "latent")
        _check_positive(self.decoder, ["width", "groups"], "decoder")
        if self.decoder.width % self.decoder.groups:
            raise ConfigError("decoder.width", f"{self.decoder.width} is not divisible by decoder.groups")
        lk = self.likelihood
        if lk.kind == "bernoulli" and self.bit_depth != 1:
            raise ConfigError("likelihood.kind", f"bernoulli needs binarized data (bit_depth 1), got bit_depth {self.bit_depth}")
        if lk.kind == "logistic_mixture" and self.bit_depth != 8:
            raise ConfigError("likelihood.kind", f"logistic_mixture models 8-bit data, got bit_depth {self.bit_depth}")
        _check_positive(lk, ["num_mixtures"], "likelihood")
        o = self.objective
        if o.kl_warmup_steps < 0 or not 0.0 <= o.kl_warmup_start <= 1.0:
            raise ConfigError("objective.kl_warmup_steps", "need kl_warmup_steps >= 0 and 0 <= kl_warmup_start <= 1")
        if o.memory == "chain" and self.kind == "kpp" and not self.encoder_is_causal:
            raise ConfigError("encoder.shift_direction", "objective.memory=chain scores x_t under the memory of the images "
                              "before it, but shift_direction=both lets x_{t-1}'s embedding see x_t: use "
                              "encoder.shift_direction=past (or shift_fraction=0), or objective.memory=episode")
        if o.held_out and o.memory == "chain":
            raise ConfigError("objective.held_out", "objective.memory=chain already scores every image without it in "
                              "memory: leave held_out at 0, or set objective.memory=episode")
        if o.held_out and self.kind != "kpp":
            raise ConfigError("objective.held_out", f"held-out images need the K++ memory, not memory.writer={m.writer!r}")
        if not 0 <= o.held_out < self.episode_length:
            raise ConfigError("objective.held_out", f"must be in [0, episode_length={self.episode_length}), got {o.held_out}")
        if o.key_free_bits < 0 or not math.isfinite(o.key_free_bits):
            raise ConfigError("objective.key_free_bits", f"must be a finite number >= 0, got {o.key_free_bits}")
        return self


def _check_types(obj: Any, prefix: str) -> None:
    """Every field holds a value of its annotated type (an int is a float; a bool is never a number), so a value
    that YAML or a command line read as the wrong type is named here rather than failing deep inside torch."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(path, f"expected a mapping of {hint.__name__} fields, got {value!r}")
            _check_types(value, path)
        elif typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                choices = ", ".join(repr(a) for a in typing.get_args(hint))
                raise ConfigError(path, f"must be one of {choices}, got {value!r}")
        elif hint is bool:
            if not isinstance(value, bool):
                raise ConfigError(path, f"must be true or false, got {value!r}")
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(path, f"must be an integer, got {value!r}")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(path, f"must be a number, got {value!r}")


def _check_positive(obj: Any, names: list[str], prefix: str = "") -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            path = f"{prefix}.{name}" if prefix else name
            raise ConfigError(path, f"must be a positive integer, got {value!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(path, f"unknown field (known: {', '.join(sorted(fields))})")
        default = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default):
            value = _from_dict(default, value, path)
        elif hints[key] is float and isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes any numeral.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"must be a number, got {value!r}") from None
        kwargs[key] = value
    return cls(**kwargs)
