"""Deterministic autoencoders, plain and denoising: the baselines the VAE is compared with.

An autoencoder maps x to one code ``z = f(x)`` and back, ``x_hat = g(z)``, and is
trained on a reconstruction loss alone (binary cross-entropy or squared error summed
over pixels; no prior, no KL). The denoising autoencoder (Vincent et al., 2008) is
the same network fed a corrupted input and asked for the clean one.

It trains in vi_lab's one loop as a Pyro model without latent variables
(:meth:`Autoencoder.model`: a factor of minus the reconstruction loss per datapoint,
and an empty :meth:`Autoencoder.guide`), so its "ELBO" is minus its reconstruction
loss and :func:`vi_lab.fit` gives it batching, binarization, checkpoints and resume.

It has no distribution over codes, so "sampling" means decoding latent points chosen
by hand: :meth:`Autoencoder.sample` decodes ``z ~ N(0, I)`` (the VAE's prior) and
:func:`random_codes` draws from other guesses (uniform in the box the training codes
span, a Gaussian fitted to them). ``examples/autoencoders.py`` shows how such decodes
compare with the VAE's prior samples.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pyro
import torch
from torch import nn

from vi_lab.nets import make_decoder, make_encoder


def _bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def _mse(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) - x).pow(2).sum(-1)


#: per-datapoint reconstruction losses on decoder logits, summed over pixels, shape (B,)
RECONSTRUCTION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce": _bce,
    "mse": _mse,
}


def _gaussian_noise(x: torch.Tensor, level: float) -> torch.Tensor:
    return (x + level * torch.randn_like(x)).clamp(0.0, 1.0)


def _masking(x: torch.Tensor, level: float) -> torch.Tensor:
    return x * (torch.rand_like(x) >= level).to(x.dtype)


#: input corruptions of the denoising autoencoder: ``corrupt(x, noise) -> x_tilde``
CORRUPTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "none": lambda x, level: x,
    "gaussian": _gaussian_noise,  # add N(0, noise^2) per pixel, clamp to [0, 1]
    "masking": _masking,  # set a fraction ``noise`` of the pixels to 0
}


class Autoencoder(nn.Module):
    """A deterministic autoencoder; with a corruption it is a denoising autoencoder.

    :param latent_dim: code size D.
    :param hidden: encoder hidden widths (the decoder mirrors them).
    :param arch: ``"mlp"`` or ``"conv"`` (the same networks as the VAE's).
    :param loss: a key of :data:`RECONSTRUCTION_LOSSES` (``"bce"`` or ``"mse"``).
    :param corruption: a key of :data:`CORRUPTIONS`; ``"none"`` is the plain autoencoder.
    :param noise: corruption level (noise standard deviation, or masked fraction).
    :param x_dim: flattened observation size.
    :param name: prefix of its parameters in Pyro's param store.

    Example::

        dae = Autoencoder(latent_dim=20, hidden=[400], corruption="masking", noise=0.5)
        vi_lab.fit(dae.model, dae.guide, x_train, epochs=10)  # train_elbo = -reconstruction loss
        dae.reconstruct(x_test[:8])  # (8, 784), in [0, 1]
    """

    def __init__(
        self,
        latent_dim: int = 20,
        hidden: int | Sequence[int] = (400,),
        *,
        arch: str = "mlp",
        loss: str = "bce",
        corruption: str = "none",
        noise: float = 0.0,
        x_dim: int = 784,
        name: str = "autoencoder",
    ) -> None:
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        if loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {sorted(RECONSTRUCTION_LOSSES)}")
        if corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {corruption!r}; valid: {sorted(CORRUPTIONS)}")
        max_noise = 1.0 if corruption == "masking" else math.inf
        if not 0.0 <= noise < max_noise:
            raise ValueError(f"noise must be in [0, {max_noise}) for corruption {corruption!r}, got {noise!r}")
        if corruption != "none" and noise == 0.0:
            raise ValueError(f"corruption {corruption!r} with noise=0 is the plain autoencoder; give noise > 0")
        self.latent_dim, self.x_dim, self.loss_name, self.name = latent_dim, x_dim, loss, name
        self.corruption, self.noise = corruption, float(noise)
        hidden_list = [hidden] if isinstance(hidden, int) else list(hidden)
        self.encoder = make_encoder(arch, x_dim, hidden_list)
        self.head = nn.Linear(self.encoder.out_dim, latent_dim)
        self.decoder = make_decoder(arch, latent_dim, hidden_list[::-1], x_dim)

    @property
    def denoising(self) -> bool:
        return self.corruption != "none"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code ``z = f(x)``, shape ``(B, D)``."""
        return self.head(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder logits of the reconstruction of ``x``, shape ``(B, x_dim)``."""
        return self.decoder(self.encode(x))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per-datapoint reconstruction loss ``(B,)``; in training mode the input is corrupted first.

        :param x: clean batch ``(B, x_dim)`` in [0, 1]: always the target.
        """
        x_in = CORRUPTIONS[self.corruption](x, self.noise) if self.training else x
        return RECONSTRUCTION_LOSSES[self.loss_name](self(x_in), x)

    def model(self, x: torch.Tensor) -> None:
        """The Pyro model :func:`vi_lab.fit` trains: ``-loss(x)`` as a factor per datapoint, no latent site."""
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            pyro.factor("reconstruction", -self.loss(x))

    def guide(self, x: torch.Tensor) -> None:
        """Nothing to infer: the code is a deterministic function of x."""

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image (pixel means in [0, 1]) decoded from codes ``(..., D)``."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``g(f(x))`` in [0, 1], without corruption."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Decode ``n`` codes ``z ~ N(0, I)``, the draw a VAE's prior makes (nothing trained the AE for it)."""
        device = device or next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent_dim, device=device))


def _box(codes: torch.Tensor, n: int) -> torch.Tensor:
    lo, hi = codes.min(0).values, codes.max(0).values
    return lo + (hi - lo) * torch.rand(n, codes.shape[1], device=codes.device)


def _fitted_gaussian(codes: torch.Tensor, n: int) -> torch.Tensor:
    cov = torch.cov(codes.T).reshape(codes.shape[1], codes.shape[1])
    cov = cov + 1e-5 * torch.eye(codes.shape[1], device=codes.device, dtype=codes.dtype)
    return torch.distributions.MultivariateNormal(codes.mean(0), covariance_matrix=cov).sample((n,))


#: ways to pick "random" latent points for a model without a prior, from its training codes
CODE_SAMPLERS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "standard_normal": lambda codes, n: torch.randn(n, codes.shape[1], device=codes.device),
    "box": _box,  # uniform in the bounding box of the codes
    "fitted_gaussian": _fitted_gaussian,  # a full-covariance Gaussian fitted to the codes
}


def random_codes(codes: torch.Tensor, n: int, kind: str = "box") -> torch.Tensor:
    """Draw ``n`` latent points by a rule of :data:`CODE_SAMPLERS`, from training codes ``(N, D)``.

    :param codes: encoder outputs of the training set.
    :param n: number of points.
    :param kind: ``"standard_normal"``, ``"box"`` or ``"fitted_gaussian"``.

    Example::

        z = random_codes(ae.encode(x_train), 64, "box")
        images = ae.decode(z)
    """
    try:
        sampler = CODE_SAMPLERS[kind]
    except KeyError:
        raise ValueError(f"unknown code sampler {kind!r}; valid: {sorted(CODE_SAMPLERS)}") from None
    if codes.dim() != 2 or codes.shape[0] < 2:
        raise ValueError(f"codes must be (N, D) with N >= 2, got {tuple(codes.shape)}")
    return sampler(codes, n)


@torch.no_grad()
def reconstruction_loss(ae: Autoencoder, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Per-datapoint reconstruction loss of clean inputs, ``(N,)`` (summed over pixels).

    :param ae: the autoencoder (evaluated without corruption).
    :param x: data ``(N, x_dim)``.
    :param batch_size: images per chunk.

    Example::

        reconstruction_loss(ae, x_test).mean()  # nats per image for BCE on binary images
    """
    was_training = ae.training
    ae.eval()
    out = torch.cat([ae.loss(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    ae.train(was_training)
    return out
