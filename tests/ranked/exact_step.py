"""Run by tests/test_distributed.py, on 1 process or under torchrun: ``exact_step.py OUT N EPOCHS``.

Trains two pairs whose gradients are deterministic, so N processes must take exactly the
steps one process takes on the whole batch: a Gaussian VAE written by hand whose guide's
noise is fixed per datapoint (the datapoint's index is the pair's second argument), and
vi_lab's categorical VAE with the enumerated (exact) ELBO gradient. Each rank saves its
parameters and history to ``OUT/rank{r}.pt``.
"""
import sys

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import vi_lab
from vi_lab import distributed
from vi_lab.guides import CategoricalGuide
from vi_lab.models.discrete import CategoricalVAE

out, n, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class Pair(nn.Module):
    """A Gaussian VAE written by hand; its guide's noise is fixed per datapoint (indexed by `idx`)."""
    def __init__(self, x_dim=12, z_dim=3):
        super().__init__()
        self.dec, self.enc = nn.Linear(z_dim, x_dim), nn.Linear(x_dim, 2 * z_dim)
        self.eps = torch.randn(1000, z_dim, generator=torch.Generator().manual_seed(99))  # the same on every rank
    def model(self, x, idx):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)
    def guide(self, x, idx):
        pyro.module("enc", self.enc)
        loc, log_scale = self.enc(x).chunk(2, -1)
        q = dist.Normal(loc, log_scale.exp())
        z = loc + log_scale.exp() * self.eps[idx]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(z, log_density=q.log_prob(z).sum(-1), event_dim=1))


def store() -> dict:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


distributed.setup()  # (fit joins by itself; the rank is needed below)
torch.manual_seed(0)
x = (torch.rand(n, 12) < 0.4).float()
pyro.set_rng_seed(1 + distributed.world().rank)  # different initial weights per rank: fit shares rank 0's
pair = Pair()
r = vi_lab.fit(pair.model, pair.guide, (x, torch.arange(n)), epochs=epochs, batch_size=128, lr=0.05, progress=False)
saved = {"gaussian": store(), "history": r.history, "world_size": r.world_size, "backend": r.backend}

pyro.set_rng_seed(2)
model, guide = CategoricalVAE(3, (8,), x_dim=12), CategoricalGuide.make(3, hidden=(8,), x_dim=12)
vi_lab.fit(model, guide, x, estimator="enum", epochs=epochs, batch_size=128, lr=0.05, progress=False)
saved["enum"] = store()
torch.save(saved, f"{out}/rank{distributed.world().rank}.pt")
