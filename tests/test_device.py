"""Library code makes its tensors on the data's device, checked on any machine.

PyTorch's ``meta`` device stands in for a GPU: its tensors have shapes and a device but no
values, and an operation that mixes them with CPU tensors fails as it would on CUDA
("Expected all tensors to be on the same device"). A tensor that library code creates on
the CPU by default, where it serves data on another device, therefore fails here without a
GPU (the evaluators' first GPU crash was such a tensor: the zero log-density of a plate's
subsample site). Paths that read values (``.item()``, a training step) cannot run on
``meta``; ``pytest --device cuda`` covers them on a GPU.
"""

import pyro
import pytest
import torch

from vi_lab import evaluate
from vi_lab.device import check_modules_on, pick_device, resolve_device
from vi_lab.guides import GUIDES, LOCAL_GUIDES, make_guide, make_local_guide
from vi_lab.models import VAE
from vi_lab.models.ppca import PPCA, PPCAPosteriorGuide

META = torch.device("meta")


@pytest.fixture(autouse=True)
def _no_validation():
    # validation reads values (support checks), which meta tensors do not have
    with pyro.validation_enabled(False):
        yield


@pytest.mark.parametrize("family", sorted(GUIDES))
def test_evaluators_stay_on_the_data_device_for_every_guide_family(family):
    model = VAE(4, [16]).to(META)
    guide = make_guide(family, latent_dim=4, hidden=[16]).to(META)
    x = torch.empty(6, 784, device=META)
    assert evaluate.elbo(model, guide, x, num_samples=3).device == META
    assert evaluate.log_likelihood(model, guide, x, num_samples=3).shape == (6,)
    assert evaluate.log_weights(model, guide, x, num_samples=3).device == META
    assert evaluate.elbo_terms(model, guide, x, num_samples=2)["kl"].device == META


@pytest.mark.parametrize("family", sorted(LOCAL_GUIDES))
def test_local_guides_start_on_the_data_device_and_evaluate_there(family):
    amortized = make_guide(family, latent_dim=4, hidden=[16]).to(META)
    x = torch.empty(5, 784, device=META)
    local = make_local_guide(family, init_from=amortized, x=x)
    assert {p.device for p in local.parameters()} == {META}
    assert evaluate.log_likelihood(VAE(4, [16]).to(META), local, x, num_samples=2, batch_size=5).device == META


def test_ppca_oracle_quantities_follow_the_model_device():
    model = PPCA(torch.randn(6, 3)).to(META)
    x = torch.empty(4, 6, device=META)
    assert model.log_marginal(x).device == META
    assert model.posterior(x).mean.device == META
    assert model.sample(3).device == META
    assert evaluate.elbo(model, PPCAPosteriorGuide(model), x).device == META


def test_resolve_device_follows_the_data_unless_told():
    x = torch.empty(2, device=META)
    assert resolve_device(None, x) == META
    assert resolve_device("cpu", x) == torch.device("cpu")
    assert resolve_device("auto", x) == pick_device()


@pytest.mark.parametrize("bad", ["gpu", "cuda:99"])
def test_unknown_or_missing_devices_are_clear_errors(bad):
    with pytest.raises(ValueError, match="device"):
        pick_device(bad)


def test_plain_functions_are_not_checked_and_mismatched_modules_are():
    check_modules_on(torch.zeros(2), lambda x: None, "not a module")  # nothing to find: no error
    with pytest.raises(ValueError, match="x_test is on cpu but the Linear's parameters are on meta"):
        check_modules_on(torch.zeros(2), torch.nn.Linear(2, 2).to(META), what="x_test")
