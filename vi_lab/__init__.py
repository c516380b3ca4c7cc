"""vi_lab: a variational-inference lab on Pyro.

Train latent-variable models with SVI and measure how good the approximate inference
is: per-datapoint ELBO, importance-sampled log-likelihood, and the inference gap.

Example::

    import vi_lab
    train = vi_lab.load_dataset("mnist", "train")
    model = vi_lab.VAE(latent_dim=20)
    guide = vi_lab.make_guide("mean_field", latent_dim=20)
    vi_lab.fit(model, guide, train.images, epochs=10, binarize="dynamic")

The names below are imported on first use, so ``import vi_lab`` (and the ``vi-lab``
command's help) does not pay for torch and Pyro until something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ContractError": "vi_lab.contract", "check_pair": "vi_lab.contract",
    "load_dataset": "vi_lab.data",
    "elbo": "vi_lab.evaluate", "log_likelihood": "vi_lab.evaluate", "ais_log_likelihood": "vi_lab.ais",
    "GUIDES": "vi_lab.guides", "make_guide": "vi_lab.guides",
    "pick_device": "vi_lab.device",
    "FitResult": "vi_lab.infer", "TrainingDiverged": "vi_lab.infer", "TrainingUnstable": "vi_lab.infer",
    "fit": "vi_lab.infer",
    "VAE": "vi_lab.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("__"):
        try:  # vi_lab.infer, vi_lab.gaps, ... after a bare `import vi_lab`
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
