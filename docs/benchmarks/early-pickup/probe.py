"""Probe harness for the early pick-up (issue 23): variants switched by PROBE (comma-separated), applied to
research.memory_experiment's model. From the repository root:

    PROBE=prior0,constblock PYTHONPATH=. python docs/benchmarks/early-pickup/probe.py --name x --steps 250 \
        --threads 1 --test-episodes 32 --iwae-samples 8 model.objective.kl_warmup_steps=100

prior0      the prior's output layer starts at zero: p(z | reads) starts as N(0, I), as the VAE's prior
constblock  the key writer's blocks start spatially constant (one C_m vector per image and key)
pos=S       a learned offset per episode position and key added to the key means, started as a grid (spread S)
posscale=V  ... and V on the scale coordinate
keylv=V     key log-variance: no input dependence, a learned bias per key and dim started at V
keylvfix    ... and held fixed (no gradient)
keylvinit=V amortised key log-variance as before, its input weights started at 0 and its bias at V
direct      the prior's mean gets a linear readout of the window means of the K blocks (started at zero)
idinit      constblock and direct tied at init so that a read of x_t's own write returns its z_mean: block k's
            channel c is z_mean[k * C_m + c], and the readout is the identity (needs K * C_m == d_z)
idvar       idinit, and the blocks also carry z_logvar (channels K * C_m == 2 d_z): the prior's log-variance is read
            back as well (identity at init), so a clean read of x_t's own write gives p(z | reads) = q(z | X)
covnorm=τ   the memory also carries each write's coverage (one more channel: the constant-1 block placed like the
            code); a read's window mean is divided by its coverage (at least τ), so a read that lands anywhere on
            x_t's own write returns its code unattenuated
span=S      (with covnorm) an image's write covers S times the region its read at the key mean covers
priorstd    p(z | reads) = N(0, I) whatever is read (a VAE with keys that nothing uses)
"""
import dataclasses
import math
import os

import torch
from torch import nn

from kpp import model
from kpp.model import KEY_DIM

opts = {}
for item in filter(None, os.environ.get("PROBE", "").split(",")):
    k, _, v = item.partition("=")
    opts[k] = v
print("PROBE", opts, flush=True)
Model = model.KanervaPlusPlus
orig_init, orig_encode, orig_read_prior = Model.__init__, Model.encode, Model.read_prior


def grid(t, k, spread):
    n = t * k
    side = math.ceil(math.sqrt(n))
    lin = torch.linspace(-0.75, 0.75, side)
    pts = torch.cartesian_prod(lin, lin)[torch.randperm(side * side, generator=torch.Generator().manual_seed(0))[:n]]
    off = torch.zeros(t, k, KEY_DIM)
    off[..., 1:] = spread * torch.atanh(pts).view(t, k, 2)
    return off


def init(self, cfg):
    orig_init(self, cfg)
    if self.kind != "kpp":
        return
    k, c, w, dz = cfg.keys.num_reads, cfg.memory.channels, cfg.read.window, cfg.latent.dim
    if "prior0" in opts:
        last = self.z_prior.out[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    if "constblock" in opts and hasattr(self.writer, "block"):
        with torch.no_grad():
            wt = self.writer.block.weight.view(k, c, w * w, -1)
            wt.copy_(wt[:, :, :1].expand_as(wt))
            bs = self.writer.block.bias.view(k, c, w * w)
            bs.copy_(bs[:, :, :1].expand_as(bs))
    if "pos" in opts:
        off = grid(cfg.episode_length, k, float(opts["pos"] or 1.0))
        off[..., 0] = float(opts.get("posscale") or 0.0)
        self.key_position = nn.Parameter(off)
    if "keylvinit" in opts:  # amortised as before, the input weights started at zero
        with torch.no_grad():
            self.key_posterior.weight.view(k, 2, KEY_DIM, -1)[:, 1].zero_()
            self.key_posterior.bias.view(k, 2, KEY_DIM)[:, 1].fill_(float(opts["keylvinit"]))
    if "keylv" in opts:
        mask = torch.ones(k, 2, KEY_DIM)
        mask[:, 1] = 0.0
        with torch.no_grad():
            self.key_posterior.weight.view(k, 2, KEY_DIM, -1)[:, 1].zero_()
            self.key_posterior.bias.view(k, 2, KEY_DIM)[:, 1].fill_(float(opts["keylv"]))
        self.key_posterior.weight.register_hook(lambda g: g * mask.reshape(-1, 1).to(g))
        if "keylvfix" in opts:
            self.key_posterior.bias.register_hook(lambda g: g * mask.reshape(-1).to(g))
    if "direct" in opts or "idinit" in opts:
        self.direct = nn.Linear(k * c, dz)
        nn.init.zeros_(self.direct.weight)
        nn.init.zeros_(self.direct.bias)
    if "idvar" in opts:
        assert k * c == 2 * dz, (k, c, dz)
        self.direct = nn.Linear(k * c, 2 * dz)
        with torch.no_grad():
            self.direct.weight.copy_(torch.eye(2 * dz))
            self.direct.bias.zero_()
            zw, zb = self.z_posterior.weight, self.z_posterior.bias  # [mean; logvar] rows
            self.writer.block.weight.view(k, c, w * w, -1).copy_(zw.view(k, c, 1, -1).expand(k, c, w * w, -1))
            self.writer.block.bias.view(k, c, w * w).copy_(zb.view(k, c, 1).expand(k, c, w * w))
    if "idinit" in opts:
        assert k * c == dz, (k, c, dz)
        with torch.no_grad():
            zw, zb = self.z_posterior.weight[:dz], self.z_posterior.bias[:dz]  # the mean half
            self.writer.block.weight.view(k, c, w * w, -1).copy_(zw.view(k, c, 1, -1).expand(k, c, w * w, -1))
            self.writer.block.bias.view(k, c, w * w).copy_(zb.view(k, c, 1).expand(k, c, w * w))
            self.direct.weight.copy_(torch.eye(dz))


def encode(self, x):
    enc = orig_encode(self, x)
    if hasattr(self, "key_position"):
        t = enc.key_mean.shape[1]
        enc = dataclasses.replace(enc, key_mean=enc.key_mean + self.key_position[:t])
    return enc


def read_prior(self, memory, keys):
    if "priorstd" in opts:
        b, t = keys.shape[:2]
        zero = keys.new_zeros(b, t, self.cfg.latent.dim)
        return zero, zero
    if not hasattr(self, "direct"):
        return orig_read_prior(self, memory, keys)
    from kpp.memory import key_to_affine, read
    b, t, k, _ = keys.shape
    theta = key_to_affine(keys, self.cfg.keys.min_scale, self.cfg.keys.max_scale)
    if memory.dim() == 5:
        blocks = read(memory.flatten(0, 1), theta.view(b * t, k, 2, 3), self.cfg.read.window)
    else:
        blocks = read(memory, theta.view(b, t * k, 2, 3), self.cfg.read.window)
    blocks = blocks.reshape(b * t, k, *blocks.shape[2:])
    if "covnorm" in opts:
        cov = blocks[:, :, -1:].mean((-1, -2), keepdim=True).clamp(min=float(opts["covnorm"] or 0.5))
        blocks = blocks[:, :, :-1] / cov
    mean, logvar = self.z_prior(blocks, keys.reshape(b * t, k, KEY_DIM))
    if "idvar" in opts:
        dmean, dlogvar = self.direct(blocks.mean((-1, -2)).flatten(1)).chunk(2, dim=1)
        mean, logvar = mean + dmean, (logvar + dlogvar).clamp(model.LOGVAR_MIN, model.LOGVAR_MAX)
    else:
        mean = mean + self.direct(blocks.mean((-1, -2)).flatten(1))
    return mean.view(b, t, -1), logvar.view(b, t, -1)


orig_write = Model.write


def write(self, enc):
    memory = orig_write(self, enc)
    if "covnorm" not in opts or self.kind != "kpp":
        return memory
    from kpp.memory import key_to_affine, place
    cfg = self.cfg
    b, t, k = enc.key_mean.shape[:3]
    theta = key_to_affine(enc.key_mean, cfg.keys.min_scale, cfg.keys.max_scale).view(b, t * k, 2, 3)
    ones = theta.new_ones(b, t * k, 1, cfg.read.window, cfg.read.window)
    coverage = place(ones, theta, cfg.memory.height, cfg.memory.width, cfg.memory.placement, group=t * k)[:, 0]
    return torch.cat([memory, coverage], dim=1)


def span_contributions(self, embedding, key_mean):
    """KeyWriter.contributions with each write's region S times its read's (same centre)."""
    from kpp.memory import key_to_affine, place
    b, t = embedding.shape[:2]
    m, w, k = self.cfg.memory, self.cfg.read.window, self.cfg.keys.num_reads
    blocks = self.block(embedding).view(b, t * k, m.channels, w, w)
    theta = key_to_affine(key_mean, self.cfg.keys.min_scale, self.cfg.keys.max_scale).view(b, t * k, 2, 3)
    theta = torch.cat([theta[..., :2] * SPAN, theta[..., 2:]], dim=-1)
    return place(blocks, theta, m.height, m.width, m.placement, group=k)


SPAN = float(opts.get("span") or 1.0)
if SPAN != 1.0:
    from kpp import memory as _memory
    _memory.KeyWriter.contributions = span_contributions
    _orig_write = write

    def write(self, enc):  # the coverage too covers the wider region
        memory = orig_write(self, enc)
        if "covnorm" not in opts:
            return memory
        from kpp.memory import key_to_affine, place
        cfg = self.cfg
        b, t, k = enc.key_mean.shape[:3]
        theta = key_to_affine(enc.key_mean, cfg.keys.min_scale, cfg.keys.max_scale).view(b, t * k, 2, 3)
        theta = torch.cat([theta[..., :2] * SPAN, theta[..., 2:]], dim=-1)
        ones = theta.new_ones(b, t * k, 1, cfg.read.window, cfg.read.window)
        coverage = place(ones, theta, cfg.memory.height, cfg.memory.width, cfg.memory.placement, group=t * k)[:, 0]
        return torch.cat([memory, coverage], dim=1)

Model.__init__, Model.encode, Model.read_prior, Model.write = init, encode, read_prior, write
from research import memory_experiment  # noqa: E402

orig_evaluate = memory_experiment.evaluate


@torch.no_grad()
def evaluate(m, episodes, **kw):
    """Also print KL_z split into its mean part 0.5 (mu_q - mu_p)^2 / var_p and the rest, and the prior's and the
    posterior's mean log-variance over the dims the posterior uses (var_q < 0.5)."""
    if m.kind == "kpp":
        m.eval()
        x = episodes[:16]
        enc = m.encode(x)
        noise = model.Noise.draw(m.cfg, x.shape[0], x.shape[1], generator=torch.Generator().manual_seed(0))
        y = enc.key_mean + torch.exp(0.5 * enc.key_logvar) * noise.key
        pm, plv = m.read_prior(m.write(enc), y)
        mean_part = (0.5 * (enc.z_mean - pm) ** 2 / plv.exp()).sum(-1).mean()
        from kpp.objective import gaussian_kl
        total = gaussian_kl(enc.z_mean, enc.z_logvar, pm, plv).sum(-1).mean()
        used = enc.z_logvar.exp() < 0.5
        print(f"DIAG KL_z {total:.2f} = mean part {mean_part:.2f} + variance part {total - mean_part:.2f}; "
              f"used dims {used.float().sum(-1).mean():.1f}; logvar q {enc.z_logvar[used].mean():.2f} "
              f"p {plv[used].mean():.2f}", flush=True)
    return orig_evaluate(m, episodes, **kw)


memory_experiment.evaluate = evaluate
if __name__ == "__main__":
    memory_experiment.main()
