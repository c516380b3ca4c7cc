"""Figures: prior samples, reconstructions, the 2-D latent manifold, training curves.

Every function writes one PNG and returns its path. Image grids go through
torchvision's ``make_grid``; plots through matplotlib's non-interactive Agg backend.
ELBOs and log-likelihoods are labelled in nats per datapoint (higher is better).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

IMAGE_SHAPE = (1, 28, 28)


def _as_images(x: torch.Tensor, image_shape=IMAGE_SHAPE) -> torch.Tensor:
    return x.detach().float().cpu().reshape(-1, *image_shape).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 8, image_shape=IMAGE_SHAPE) -> Path:
    """Save flattened images ``(N, C*H*W)`` as one grid PNG.

    :param images: values in [0, 1].
    :param path: output file.
    :param nrow: images per row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(_as_images(images, image_shape), nrow=nrow, padding=2, pad_value=1.0), path)
    return path


@torch.no_grad()
def posterior_mean(guide: Any, x: torch.Tensor, num_samples: int = 64) -> torch.Tensor:
    """The guide's mean of q(z | x), by Monte Carlo when the family has no closed form.

    :param guide: a guide with ``get_posterior(x)`` (every vi_lab amortized guide).
    :param x: batch ``(B, x_dim)``.
    """
    q = guide.get_posterior(x)
    try:
        return q.mean
    except NotImplementedError:  # flows: no closed-form mean
        return q.sample((num_samples,)).mean(0)


@torch.no_grad()
def save_samples(model: Any, path: str | Path, *, n: int = 64, nrow: int = 8) -> Path:
    """Decoder means of ``n`` draws z ~ p(z) (``model.sample``), as a grid.

    Example::

        save_samples(vae, "runs/x/samples.png")
    """
    return save_grid(model.sample(n), path, nrow=nrow)


@torch.no_grad()
def save_reconstructions(model: Any, guide: Any, x: torch.Tensor, path: str | Path, *, n: int = 8) -> Path:
    """Inputs (top row) over reconstructions ``decode(E_q[z | x])`` (bottom row)."""
    x = x[:n]
    recon = model.decode(posterior_mean(guide, x))
    return save_grid(torch.cat([x, recon]), path, nrow=x.shape[0])


@torch.no_grad()
def save_manifold(model: Any, path: str | Path, *, n: int = 20) -> Path:
    """Decoder means over an ``n x n`` grid of a 2-D latent space (Kingma & Welling, Fig. 4).

    The grid is uniform in (0, 1)^2 pushed through the inverse Gaussian CDF, so it
    covers the prior's mass evenly.

    :raises ValueError: when the model's latent space is not 2-D.
    """
    if getattr(model, "latent_dim", None) != 2:
        raise ValueError(f"the manifold needs a 2-D latent space, the model has {model.latent_dim} "
                         "(train with --latent-dim 2)")
    device = next(model.parameters()).device
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, device=device)
    g = torch.distributions.Normal(0.0, 1.0).icdf(u)
    # rows top to bottom run from high to low z_2, like a plot's y axis
    z = torch.stack(torch.meshgrid(g.flip(0), g, indexing="ij"), dim=-1)[..., [1, 0]].reshape(-1, 2)
    return save_grid(model.decode(z), path, nrow=n)


def save_curves(history: Sequence[dict], path: str | Path, *, keys: Sequence[str] = ("train_elbo", "test_elbo"),
                title: str = "Training curves") -> Path:
    """ELBO per epoch (nats per datapoint) for each key present in ``history``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per datapoint, higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
