"""Generative models p(x, z) written as Pyro models."""

from vi_lab.models.likelihoods import LIKELIHOODS, make_likelihood
from vi_lab.models.vae import VAE

__all__ = ["LIKELIHOODS", "VAE", "make_likelihood"]
