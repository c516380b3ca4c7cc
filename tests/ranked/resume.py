"""Run by tests/test_distributed.py under torchrun: ``resume.py OUT``.

Trains 3 epochs without a stop, then 2 epochs and a resume to 3, on a small VAE with
dynamic binarization (random draws in every step); continues ``OUT/single`` (a run of one
process, when there is one) to 3 epochs; saves the parameters and histories to
``OUT/rank{r}.pt``. The runs' directories stay for the test to resume on one process.
"""
import sys
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import distributed

out = Path(sys.argv[1])
distributed.setup()
torch.manual_seed(0)
x = torch.rand(300, 16)


def run(where: Path, epochs: int, resume: bool = False) -> dict:
    pyro.set_rng_seed(5)
    model = vi_lab.VAE(4, [8], x_dim=16)
    guide = vi_lab.make_guide("mean_field", latent_dim=4, hidden=[8], x_dim=16)
    r = vi_lab.fit(model, guide, x, epochs=epochs, batch_size=50, lr=1e-2, binarize="dynamic", seed=7,
                   checkpoint_dir=where, resume=resume, progress=False)
    return {"params": {k: v.detach().clone() for k, v in pyro.get_param_store().items()}, "history": r.history}


saved = {"straight": run(out / "straight", 3), "first": run(out / "stopped", 2)}
saved["resumed"] = run(out / "stopped", 3, resume=True)
if (out / "single").is_dir():  # a checkpoint one process wrote, continued on these processes
    saved["from_single"] = run(out / "single", 3, resume=True)
torch.save(saved, out / f"rank{distributed.world().rank}.pt")
