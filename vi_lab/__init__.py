"""vi_lab: a variational-inference lab on Pyro.

Train latent-variable models with SVI and measure how good the approximate inference
is: per-datapoint ELBO, importance-sampled log-likelihood, and the inference gap.

Example::

    import vi_lab
    train = vi_lab.load_dataset("mnist", "train")
    model = vi_lab.VAE(latent_dim=20)
    guide = vi_lab.make_guide("mean_field", latent_dim=20)
    vi_lab.fit(model, guide, train.images, epochs=10, binarize="dynamic")
"""

from vi_lab.contract import ContractError, check_pair
from vi_lab.data import load_dataset
from vi_lab.evaluate import elbo, log_likelihood
from vi_lab.guides import GUIDES, make_guide
from vi_lab.device import pick_device
from vi_lab.infer import FitResult, TrainingDiverged, TrainingUnstable, fit
from vi_lab.models import VAE

__version__ = "0.1.0"

__all__ = [
    "GUIDES", "VAE", "ContractError", "FitResult", "TrainingDiverged", "TrainingUnstable", "check_pair", "elbo",
    "fit", "load_dataset", "log_likelihood", "make_guide", "pick_device",
]
