"""Generative models p(x, z) written as Pyro models."""

from vi_lab.models.autoencoder import Autoencoder
from vi_lab.models.classifier import Classifier
from vi_lab.models.cvae import CVAE
from vi_lab.models.likelihoods import LIKELIHOODS, make_likelihood
from vi_lab.models.loglinear import BernoulliMixture, LogLinearLatentClass
from vi_lab.models.loglinear_pairwise import PairwiseMixture
from vi_lab.models.ppca import PPCA
from vi_lab.models.vae import VAE

__all__ = ["CVAE", "LIKELIHOODS", "VAE", "PPCA", "Autoencoder", "BernoulliMixture", "Classifier", "LogLinearLatentClass",
           "PairwiseMixture", "make_likelihood"]
