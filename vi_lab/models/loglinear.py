"""Log-linear latent-class models: the "first attempt" at feature-rich generative models.

A discrete latent class ``z`` in ``{0, ..., K-1}`` with prior ``p(z) = softmax(a)_z``
(fixed or learned) and a log-linear likelihood over a finite observation space::

    p(x | z, w) = exp(w . f(x, z)) / sum_{x'} exp(w . f(x', z))

Everything is exact by enumeration: ``log p(x) = logsumexp_z log p(x, z)``, the
posterior ``p(z | x)``, and the expected feature counts that EM's M-step matches
(:mod:`vi_lab.em`). Two models share one base class:

* :class:`LogLinearLatentClass`: the general case, a feature tensor ``F`` of shape
  ``(|X|, |Z|, d)`` (or a feature function evaluated on every pair); observations are
  indices into the observation space. Normalizing costs ``O(|X| |Z| d)``.
* :class:`BernoulliMixture`: binary ``x`` in ``{0, 1}^D`` with pixel x class indicator
  features ``f(x, z)_{k,d} = 1{z = k} x_d``. The normalizer factorizes over pixels,
  ``log sum_x exp(w_z . x) = sum_d softplus(w_{z,d})``, so ``|X| = 2^D`` never has to be
  enumerated and MNIST fits: it is a mixture of Bernoullis written as a log-linear model.

Calling a model runs it as a Pyro model with ``z`` marked for parallel enumeration,
inside the ``"data"`` plate of DESIGN.md; with :func:`empty_guide` and
``TraceEnum_ELBO(max_plate_nesting=1)`` (:func:`enum_elbo`) the ELBO is the exact
log-likelihood, which makes SVI a cross-check of EM.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from torch import nn
from torch.nn.functional import softplus

#: data points per chunk when a model scores a large dataset (bounds the (B, K) work)
CHUNK = 8192

Stats = dict[str, torch.Tensor]


class LatentClassModel(nn.Module):
    """Base class: a categorical latent class and a log-linear likelihood ``p(x | z, w)``.

    Subclasses say how to score every class at once (:meth:`component_log_prob`), give
    ``p(x | z)`` as a distribution (:meth:`component`), and write the expected
    complete-data log-likelihood in terms of expected sufficient statistics
    (:meth:`expected_stats`, :meth:`expected_log_lik`), which is all EM needs.

    :param num_classes: K, the number of latent classes.
    :param prior: fixed prior probabilities ``(K,)``; uniform when None.
    :param learn_prior: make the prior's logits a parameter (EM sets them in closed form,
        SVI learns them by gradient).
    :param dtype: dtype of the parameters.
    :param name: prefix of the parameters in Pyro's param store.
    :param device: where the parameters start (subclasses pass their data tensor's device;
        ``None``: the prior's device, else the CPU).
    """

    def __init__(self, num_classes: int, *, prior: torch.Tensor | None = None, learn_prior: bool = True,
                 dtype: torch.dtype = torch.float32, name: str = "loglinear",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if device is None and torch.is_tensor(prior):
            device = prior.device
        if prior is None:
            logits = torch.zeros(num_classes, dtype=dtype, device=device)
        else:
            prior = torch.as_tensor(prior, dtype=dtype, device=device)
            if prior.shape != (num_classes,) or (prior < 0).any() or not torch.isclose(prior.sum(), prior.new_ones(())):
                raise ValueError(f"prior must be {num_classes} non-negative probabilities summing to 1, "
                                 f"got shape {tuple(prior.shape)} summing to {prior.sum().item():.4g}")
            logits = prior.log()
        if learn_prior:
            self.prior_logits = nn.Parameter(logits)
        else:
            self.register_buffer("prior_logits", logits)
        self.num_classes, self.learn_prior, self.name = num_classes, learn_prior, name

    def _weight_parameter(self, weights: torch.Tensor | None, shape: tuple[int, ...], meaning: str) -> nn.Parameter:
        """The log-linear weights as a parameter with the prior's dtype and device: zeros when None.

        :param meaning: how the error names the expected shape, e.g. ``"(num_classes, x_dim) = (10, 784)"``.
        """
        like = self.prior_logits
        weights = like.new_zeros(shape) if weights is None else torch.as_tensor(weights, dtype=like.dtype,
                                                                                 device=like.device)
        if weights.shape != shape:
            raise ValueError(f"weights must have shape {meaning}, got {tuple(weights.shape)}")
        return nn.Parameter(weights.clone())

    # ---------------------------------------------------------------- subclass API
    def check_x(self, x: torch.Tensor) -> None:
        """Raise a ValueError saying what is wrong when ``x`` is not in the observation space."""
        raise NotImplementedError

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x | z, w)`` for every class, shape ``(B, K)``."""
        raise NotImplementedError

    def component(self, z: torch.Tensor) -> dist.TorchDistribution:
        """``p(x | z, w)`` as a distribution whose batch shape is ``z.shape``."""
        raise NotImplementedError

    def expected_stats(self, x: torch.Tensor, resp: torch.Tensor) -> Stats:
        """Expected sufficient statistics of a batch under responsibilities ``resp`` ``(B, K)``.

        Additive over batches (EM sums them over chunks); they include ``"counts"``,
        the expected class counts ``N_k = sum_n p(z = k | x_n)``, shape ``(K,)``.
        """
        raise NotImplementedError

    def expected_log_lik(self, stats: Stats) -> torch.Tensor:
        """``sum_n sum_z p(z | x_n) log p(x_n | z, w)`` from the statistics; differentiable in w."""
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator, x: torch.Tensor | None = None) -> None:
        """Draw fresh starting weights (EM's random restarts); ``x`` may guide the draw."""
        raise NotImplementedError

    def weights(self) -> list[nn.Parameter]:
        """The likelihood's parameters w (what EM's inner optimizer moves)."""
        return [p for n, p in self.named_parameters() if n != "prior_logits"]

    # ------------------------------------------------------------------ exact inference
    def log_prior(self) -> torch.Tensor:
        """``log p(z)``, shape ``(K,)``."""
        return torch.log_softmax(self.prior_logits, dim=-1)

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x, z)`` for every class, shape ``(B, K)``.

        :param x: a batch in the observation space.
        """
        self.check_x(x)
        return self.component_log_prob(x) + self.log_prior()

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x) = logsumexp_z log p(x, z)`` by enumeration, shape ``(B,)``, nats.

        Example::

            model.log_marginal(x_test).mean()  # exact test log-likelihood per datapoint
        """
        return torch.cat([self.log_joint(c).logsumexp(-1) for c in x.split(CHUNK)])

    def posterior(self, x: torch.Tensor) -> dist.Categorical:
        """Exact ``p(z | x)``: a Categorical with batch shape ``(B,)``."""
        return dist.Categorical(logits=self.log_joint(x))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` pairs ``(x, z)`` from ``p(x, z)``.

        :param n: number of draws.
        :param generator: a seeded ``torch.Generator`` on any device; the draws are made on
            its device and moved to the model's, so a CPU generator gives the same data
            whichever device the model is on.
        :returns: ``(x, z)``: observations ``(n, ...)`` and their classes ``(n,)``, on the model's device.
        """
        device = self.prior_logits.device
        where = generator.device if generator is not None else device
        z = torch.multinomial(self.log_prior().exp().to(where), n, replacement=True, generator=generator)
        return self._sample_given(z, generator).to(device), z.to(device)

    def _sample_given(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------- Pyro model
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            # under TraceEnum_ELBO z takes all K values at once in a dimension left of the
            # plate, shape (K, 1): the ELBO sums p(x, z) over z exactly
            z = pyro.sample("z", dist.Categorical(logits=self.prior_logits), infer={"enumerate": "parallel"})
            pyro.sample("x", self.component(z), obs=x)


class LogLinearLatentClass(LatentClassModel):
    """General log-linear latent-class model over a finite observation space.

    ``p(x | z, w) = softmax_x(F[:, z] @ w)`` with a feature tensor ``F`` of shape
    ``(|X|, |Z|, d)``; observations are integer indices ``0 <= x < |X|``.

    :param features: ``F``, shape ``(num_obs, num_classes, num_features)``.
    :param weights: starting w ``(d,)``; zeros when None.
    :param prior: fixed prior probabilities ``(K,)``; uniform when None.
    :param learn_prior: learn the prior (closed form in EM).

    Example::

        F = torch.randn(6, 2, 3)            # 6 observations, 2 classes, 3 features
        model = LogLinearLatentClass(F, weights=torch.tensor([1.0, -1.0, 0.5]))
        x, z = model.sample(100)            # x: indices in [0, 6)
        model.log_marginal(x)               # exact, shape (100,)
        model.posterior(x).probs            # (100, 2)
    """

    def __init__(self, features: torch.Tensor, weights: torch.Tensor | None = None, *,
                 prior: torch.Tensor | None = None, learn_prior: bool = True, name: str = "loglinear") -> None:
        if not torch.is_tensor(features) or features.dim() != 3 or 0 in features.shape:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ValueError("features must be a tensor F of shape (num_observations, num_classes, num_features) "
                             f"with no empty dimension, got {shape}")
        if not features.is_floating_point():
            features = features.double()
        if not torch.isfinite(features).all():
            raise ValueError("features must be finite")
        num_obs, num_classes, d = features.shape
        super().__init__(num_classes, prior=prior, learn_prior=learn_prior, dtype=features.dtype, name=name,
                         device=features.device)
        self.register_buffer("features", features)
        self.w = self._weight_parameter(weights, (d,), f"({d},) to match the {d} features")
        self.num_obs, self.num_features = num_obs, d

    @classmethod
    def from_function(cls, feature_fn: Callable[[Any, int], Sequence[float] | torch.Tensor], observations: Sequence[Any],
                      num_classes: int, **kwargs: Any) -> "LogLinearLatentClass":
        """Build ``F`` by evaluating ``feature_fn(x, z)`` on every pair; data are then indices.

        :param feature_fn: ``f(x, z) -> (d,)`` for an observation value ``x`` and class ``z``.
        :param observations: the observation space, listed; index ``i`` stands for ``observations[i]``.
        :param num_classes: K.
        :param kwargs: passed to the constructor (``weights``, ``prior``, ...).

        Example::

            words = ["a", "b", "c"]
            f = lambda x, z: [float(x == "a" and z == 0), float(x == "b" and z == 1)]
            model = LogLinearLatentClass.from_function(f, words, num_classes=2)
        """
        rows = [[torch.as_tensor(feature_fn(x, z), dtype=torch.float64) for z in range(num_classes)] for x in observations]
        sizes = {r.shape for row in rows for r in row}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"feature_fn must return a vector of one fixed length d for every (x, z); got shapes {sorted(sizes)}")
        return cls(torch.stack([torch.stack(row) for row in rows]), **kwargs)

    def check_x(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 1:
            raise ValueError("x must be a 1-D tensor of observation indices (B,), "
                             f"got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if x.is_floating_point() and (x != x.round()).any():
            raise ValueError("x must hold integer observation indices, got non-integer values")
        if x.numel() and (x.min() < 0 or x.max() >= self.num_obs):
            raise ValueError(f"x is outside the observation space: indices must lie in [0, {self.num_obs}), "
                             f"got values in [{x.min().item()}, {x.max().item()}]")

    def scores(self) -> torch.Tensor:
        """``w . f(x, z)`` for every pair, shape ``(|X|, K)``."""
        return self.features @ self.w

    def log_conditional(self) -> torch.Tensor:
        """The table ``log p(x | z, w)``, shape ``(|X|, K)``: each column normalized over X."""
        return torch.log_softmax(self.scores(), dim=0)

    def expected_features(self) -> torch.Tensor:
        """``E[f(X, z) | z, w]`` for every class, shape ``(K, d)`` (the M-step's model counts)."""
        p = self.log_conditional().exp()  # (|X|, K)
        return torch.einsum("xk,xkd->kd", p, self.features)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_conditional()[x.long()]  # (B, K)

    def component(self, z: torch.Tensor) -> dist.Categorical:
        return dist.Categorical(logits=self.scores().T[z])  # batch z.shape, categories |X|

    def expected_stats(self, x: torch.Tensor, resp: torch.Tensor) -> Stats:
        # C[x, z] = sum_n 1{x_n = x} p(z | x_n): expected counts over the observation table
        table = resp.new_zeros(self.num_obs, self.num_classes).index_add_(0, x.long(), resp)
        return {"counts": resp.sum(0), "table": table}

    def expected_log_lik(self, stats: Stats) -> torch.Tensor:
        # its gradient is sum_{x,z} C f(x,z) - sum_z N_z E[f(X,z)|z,w]: expected counts
        # in the data minus the counts the model expects, which the M-step drives to zero
        return (stats["table"] * self.log_conditional()).sum()

    def reset_parameters(self, generator: torch.Generator, x: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.w.copy_(torch.randn(self.num_features, generator=generator, dtype=self.w.dtype).to(self.w.device))

    def _sample_given(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        probs = self.log_conditional().exp().T.to(z.device)[z]  # (n, |X|), on the generator's device
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def starting_probabilities(K: int, D: int, generator: torch.Generator, x: torch.Tensor | None,
                           dtype: torch.dtype) -> torch.Tensor:
    """Pixel probabilities ``(K, D)`` (on the CPU) to start EM's restarts of a binary mixture from.

    Each class is a random datapoint blended half and half with the data mean; without
    ``x``, uniform(0.25, 0.75). A class whose datapoint repeats an earlier class's (small
    patches: many are empty) is moved a tenth of the way to uniform noise: identical
    classes get identical responsibilities and EM could never pull them apart.

    :param K: classes.
    :param D: pixels.
    :param generator: a seeded CPU generator (a restart's seed).
    :param x: binary data ``(N, D)`` or None.
    :param dtype: dtype of the result.

    Example::

        p = starting_probabilities(10, 784, torch.Generator().manual_seed(0), x_binary, torch.float32)
    """
    if x is None:
        return 0.25 + 0.5 * torch.rand(K, D, generator=generator, dtype=dtype)
    idx = torch.randint(len(x), (K,), generator=generator)
    xs = x[idx.to(x.device)].to("cpu", dtype)
    p = 0.5 * xs + 0.5 * x.to(dtype).mean(0).cpu()
    repeat = torch.tensor([any(torch.equal(xs[k], xs[j]) for j in range(k)) for k in range(K)])
    if repeat.any():  # drawn only then, so data without repeats (whole images) start as before
        noise = torch.rand(K, D, generator=generator, dtype=dtype)
        p[repeat] = 0.9 * p[repeat] + 0.1 * noise[repeat]
    return p


class BernoulliMixture(LatentClassModel):
    """Binary ``x`` in ``{0,1}^D`` with pixel x class features: a mixture of Bernoullis.

    The weights ``W`` ``(K, D)`` are the log-linear model's ``w`` laid out by class:
    ``w . f(x, z) = W[z] . x``. The normalizer factorizes over pixels, so
    ``p(x | z) = prod_d Bernoulli(x_d; sigmoid(W[z, d]))`` and ``sigmoid(W[z])`` is the
    class template.

    :param num_classes: K.
    :param x_dim: D.
    :param weights: starting ``W`` ``(K, D)``; zeros when None.
    :param prior: prior probabilities ``(K,)`` (the start when learned); uniform when None.
    :param learn_prior: learn the mixing weights.
    :param dtype: dtype of the parameters (data are cast to it).

    Example::

        model = BernoulliMixture(10, 784)
        result = vi_lab.em.em(model, x_binary, max_iters=50, restarts=3)
        model.templates()  # (10, 784) pixel probabilities
    """

    def __init__(self, num_classes: int, x_dim: int = 784, *, weights: torch.Tensor | None = None,
                 prior: torch.Tensor | None = None, learn_prior: bool = True, dtype: torch.dtype = torch.float32,
                 name: str = "bernoulli_mixture") -> None:
        device = weights.device if torch.is_tensor(weights) else None  # else the prior's (the base class)
        super().__init__(num_classes, prior=prior, learn_prior=learn_prior, dtype=dtype, name=name, device=device)
        if not isinstance(x_dim, int) or x_dim < 1:
            raise ValueError(f"x_dim must be a positive integer, got {x_dim!r}")
        self.W = self._weight_parameter(weights, (num_classes, x_dim),
                                        f"(num_classes, x_dim) = ({num_classes}, {x_dim})")
        self.x_dim = x_dim

    def check_x(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.x_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a (B, {self.x_dim}) tensor of binary pixels, got {shape}")
        if not ((x == 0) | (x == 1)).all():
            raise ValueError("x is outside the observation space {0, 1}^D: binarize it first "
                             "(vi_lab.data.binarize(x, 'static') or 'threshold')")

    def log_normalizer(self) -> torch.Tensor:
        """``log sum_x exp(W[z] . x) = sum_d softplus(W[z, d])`` for every class, shape ``(K,)``."""
        return softplus(self.W).sum(-1)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        # w . f(x, z) - log Z(z) for all classes at once: one (B, D) x (D, K) product,
        # instead of a (B, K, D) Bernoulli log_prob that would not fit for MNIST
        return x.to(self.W.dtype) @ self.W.T - self.log_normalizer()

    def component(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self.W[z]).to_event(1)

    def expected_stats(self, x: torch.Tensor, resp: torch.Tensor) -> Stats:
        return {"counts": resp.sum(0), "pixels": resp.T @ x.to(resp.dtype)}  # (K,), (K, D)

    def expected_log_lik(self, stats: Stats) -> torch.Tensor:
        # sum_n sum_k r_nk (W_k . x_n - log Z_k) = sum_k (S_k . W_k - N_k log Z_k): the data
        # enter only through the expected counts, so each inner step costs O(K D), not O(N K D)
        return (stats["pixels"] * self.W).sum() - (stats["counts"] * self.log_normalizer()).sum()

    def reset_parameters(self, generator: torch.Generator, x: torch.Tensor | None = None) -> None:
        """Each class starts at a random datapoint blended with the data mean (when ``x`` is
        given), else at uniform(0.25, 0.75) pixel probabilities (:func:`starting_probabilities`)."""
        K, D = self.W.shape
        with torch.no_grad():
            p = starting_probabilities(K, D, generator, x, self.W.dtype)
            self.W.copy_(torch.logit(p.clamp(0.05, 0.95)).to(self.W.device))

    @torch.no_grad()
    def templates(self) -> torch.Tensor:
        """The class templates ``sigmoid(W)``, shape ``(K, D)``: pixel probabilities per class."""
        return torch.sigmoid(self.W)

    def _sample_given(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.W.to(z.device)[z]), generator=generator)  # generator's device


def empty_guide(x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    """The guide of a model whose every latent is enumerated: nothing to sample.

    With ``TraceEnum_ELBO`` the model's enumerated ``z`` is summed out exactly, so this
    guide makes the ELBO equal ``log p(x)``.
    """


def enum_elbo() -> TraceEnum_ELBO:
    """``TraceEnum_ELBO`` for these models: one plate (``"data"``), z enumerated in parallel.

    Example::

        svi_result = vi_lab.fit(model, empty_guide, x, loss=enum_elbo(), lr=0.05)
    """
    return TraceEnum_ELBO(max_plate_nesting=1)


__all__ = ["BernoulliMixture", "LatentClassModel", "LogLinearLatentClass", "empty_guide", "enum_elbo",
           "starting_probabilities"]
