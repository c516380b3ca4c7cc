"""Run by tests/test_distributed.py under torchrun: ``estimators.py OUT``.

Trains a small VAE for one epoch with every estimator and loss of fit (checkpointed), and
saves each rank's parameters, history and what its checkpoint holds to ``OUT/rank{r}.pt``.
"""
import sys
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import checkpoint, distributed

out = Path(sys.argv[1])
COMBOS = [  # (loss, estimator, baseline, num_particles, objective)
    ("trace", "reparam", None, 1, "elbo"), ("meanfield", "reparam", None, 2, "elbo"),
    ("tracegraph", "reparam", None, 1, "elbo"), ("trace", "reinforce", None, 1, "elbo"),
    ("trace", "reinforce_baseline", "decaying_avg", 1, "elbo"), ("trace", "reinforce_baseline", "nn", 1, "elbo"),
    ("trace", "relaxed", None, 1, "elbo"), ("wake_sleep", "reparam", None, 1, "elbo"),
    ("rws", "reparam", None, 2, "elbo"), ("trace", "reparam", None, 3, "iwae"), ("trace", "reparam", None, 3, "dreg"),
]
torch.manual_seed(0)
x = (torch.rand(192, 16) < 0.3).float()
rank = distributed.setup().rank  # a script that needs its rank before fit joins first
saved = {}
for loss, est, baseline, particles, objective in COMBOS:
    name = f"{loss}-{est}-{baseline}" if objective == "elbo" else objective
    pyro.set_rng_seed(3)
    model = vi_lab.VAE(4, [8], x_dim=16)
    guide = vi_lab.make_guide("mean_field", latent_dim=4, hidden=[8], x_dim=16)
    if est == "relaxed":
        from vi_lab.guides import CategoricalGuide
        from vi_lab.models.discrete import CategoricalVAE
        model, guide = CategoricalVAE(3, (8,), x_dim=16), CategoricalGuide.make(3, hidden=(8,), x_dim=16)
    # an odd batch: shares of 32 and 31 rows
    r = vi_lab.fit(model, guide, x, loss=loss, estimator=est, baseline=baseline, num_particles=particles, epochs=1,
                   batch_size=63, lr=1e-2, progress=False, checkpoint_dir=out / name, objective=objective,
                   kl_warmup=0.5 if objective == "dreg" else 0)
    distributed.barrier()  # rank 0's checkpoint is written
    state = checkpoint.load(out / name / "last.pt")
    saved[name] = {"params": {k: v.detach().clone() for k, v in pyro.get_param_store().items()},
                   "history": r.history,
                   "checkpoint_shapes": {k: tuple(v.shape) for k, v in state["param_store"]["params"].items()}}
# refused on every rank, each with the same message: data that differs between processes, too few rows
refusals = []
for data, batch in ((x + rank, 64), (x[:1], 64)):
    pyro.set_rng_seed(3)
    model = vi_lab.VAE(4, [8], x_dim=16)
    guide = vi_lab.make_guide("mean_field", latent_dim=4, hidden=[8], x_dim=16)
    try:
        vi_lab.fit(model, guide, data, epochs=1, batch_size=batch, progress=False)
        refusals.append(None)
    except ValueError as err:
        refusals.append(str(err))
saved["refusals"] = refusals
torch.save(saved, out / f"rank{rank}.pt")
