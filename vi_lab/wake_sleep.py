"""Wake-sleep and reweighted wake-sleep as losses of the one training loop.

Wake-sleep (Hinton et al., 1995) trains the generator p(x, z) and the recognition
network q(z | x) on *different* objectives:

* **wake phase**: draw z ~ q(z | x) for each datapoint and, holding z fixed as imputed
  data, raise ``log p(x, z)`` in the generator's parameters only;
* **sleep phase**: dream pairs (z, x~) ~ p(z) p(x | z) from the model and raise
  ``log q(z | x~)`` in the recognition network's parameters only: the encoder is
  trained on fake data, never on the training set.

Reweighted wake-sleep (Bornschein & Bengio, 2015; Le et al., 2019) draws K particles
in the wake phase: the generator climbs the K-sample importance-weighted bound and the
guide may also learn in the wake phase from self-normalized weights ("wake-phi",
mixed with sleep by ``insomnia``). Classic wake-sleep is the special case K = 1,
insomnia = 0.

:class:`ReweightedWakeSleep` is a loss, Pyro's way: one call returns the *sum* of the
generator's and the recognition network's losses, built so that each term reaches only
its own network (the wake draws and the dreams are detached, and ``log q`` is detached
inside the generator's weights), so one backward pass gives each network exactly the
gradient of its own phase. :func:`vi_lab.fit` trains with it like with any ELBO
(``fit(model, guide, x, loss="wake_sleep")``), with per-network learning rates through
the optimizer (:func:`vi_lab.infer.adam`). AEVB, the comparison of Kingma & Welling's
Figure 2, is ``loss="trace"`` in the same loop.

Why not ``pyro.infer.ReweightedWakeSleep`` as it is: it sums each particle's log weight
over the whole minibatch before the log-sum-exp ("mini-batch training is not supported
yet" in its docstring), so with B datapoints it weighs K joint particles of the batch
instead of K particles per datapoint, and its weights degenerate as B grows. The
estimator here is the same per datapoint: with a batch of one it reproduces Pyro's
losses and gradients exactly (``tests/test_wake_sleep.py``). Pyro's class also needs a
guide that reads dreamed observations from an ``observations=`` keyword; vi_lab's
guides take x positionally, and would silently see the data instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from vi_lab.contract import check_pair, site_log_prob


class PhaseLosses(NamedTuple):
    """The two losses of one step, each a scalar in nats per datapoint.

    ``model_loss`` carries gradient only to the generator, ``guide_loss`` only to the
    recognition network (for AEVB both are the same -ELBO). ``train_elbo`` is a
    detached estimate of the batch's mean ELBO (or the training objective for AEVB),
    for monitoring.
    """

    model_loss: torch.Tensor
    guide_loss: torch.Tensor
    train_elbo: float


def _single_observed_site(trace) -> str:
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["infer"].get("was_observed")]
    if len(names) != 1:
        raise ValueError(f"wake-sleep dreams one observed site x for the guide to read; the model has {names}")
    return names[0]


def _require_density(guide_trace) -> None:
    """Wake-sleep evaluates log q at latents held fixed (detached draws, dreams): every guide site
    needs a density there, which flows without an inverse (planar, radial) cannot give."""
    for site in guide_trace.nodes.values():
        reason = site["type"] == "sample" and getattr(site["fn"], "score_function_error", None)
        if reason:
            raise ValueError(f"wake-sleep evaluates the guide's density at latents it did not just draw (detached "
                             f"wake draws, dreams), which needs the guide's inverse: {reason}")


def _tile(a: Any, k: int, batch: int) -> Any:
    """Repeat a batch-first tensor argument k times along dim 0 (``(B, ...) -> (k*B, ...)``)."""
    if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == batch:
        return a.repeat(k, *([1] * (a.dim() - 1)))
    return a


class ReweightedWakeSleep:
    """Reweighted wake-sleep with per-datapoint importance weights; K = 1, insomnia = 0 is wake-sleep.

    For a batch x of B datapoints, with K draws ``z_k ~ q(z | x)`` held fixed
    (detached) and weights ``log w_k = log p(x, z_k) - log q(z_k | x)``:

    * wake-theta (generator): ``-mean_b [logsumexp_k log w_kb - log K]``, gradient in the
      model's parameters only (z and log q are constants);
    * wake-phi (guide): ``-mean_b sum_k w~_kb log q(z_kb | x_b)`` with self-normalized
      weights ``w~`` (constants);
    * sleep-phi (guide): ``-mean log q(z~ | x~)`` over ``num_sleep_particles * B``
      dreamed pairs ``(z~, x~) ~ p(z) p(x | z)``;
    * guide loss: ``insomnia * wake_phi + (1 - insomnia) * sleep_phi``.

    :param num_particles: K wake particles per datapoint.
    :param insomnia: weight of wake-phi against sleep-phi, in [0, 1]; 1 uses no dreams,
        0 is the sleep phase alone (classic wake-sleep).
    :param num_sleep_particles: dreams per datapoint of the batch (default: K).

    Example::

        classic = ReweightedWakeSleep(num_particles=1, insomnia=0.0)
        losses = classic(model, guide, x_batch)
        losses.model_loss.backward()  # gradients in the generator only
    """

    def __init__(self, num_particles: int = 5, insomnia: float = 1.0, num_sleep_particles: int | None = None) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if not 0.0 <= insomnia <= 1.0:
            raise ValueError(f"insomnia must be in [0, 1] (1: wake-phi only, 0: sleep only), got {insomnia!r}")
        if insomnia > 0 and num_particles < 2:
            raise ValueError("wake-phi (insomnia > 0) needs num_particles >= 2: with one particle the "
                             "self-normalized weight is 1 and the guide gets no signal; use insomnia=0")
        sleep = num_particles if num_sleep_particles is None else num_sleep_particles
        if not isinstance(sleep, int) or sleep < 1:
            raise ValueError(f"num_sleep_particles must be a positive integer, got {num_sleep_particles!r}")
        self.num_particles, self.insomnia, self.num_sleep_particles = num_particles, float(insomnia), sleep
        self._nesting: int | None = None
        self.terms: dict[str, float] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_particles={self.num_particles}, insomnia={self.insomnia}, "
                f"num_sleep_particles={self.num_sleep_particles})")

    def _plate_nesting(self, model, guide, x, args) -> int:
        if self._nesting is None:  # static structure assumed, as in Pyro's ELBOs
            self._nesting = check_pair(model, guide, x, *args).nesting
        return self._nesting

    def wake(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Wake phase: ``(wake_theta_loss, wake_phi_loss, log_weight (K, B) detached)``.

        :param x: batch ``(B, ...)``; ``args`` are passed to model and guide (e.g. labels).
        """
        nesting = self._plate_nesting(model, guide, x, args)
        with pyro.plate("_wake_particles", self.num_particles, dim=-(nesting + 1)):
            guide_trace = poutine.trace(guide).get_trace(x, *args)
            guide_trace.detach_()  # z is imputed data: no pathwise gradient into the guide
            _require_density(guide_trace)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        log_joint = sum(site_log_prob(s, nesting + 1) for s in model_trace.nodes.values()
                        if s["type"] == "sample")  # (K, B), gradient in theta only
        log_q = sum(site_log_prob(s, nesting + 1) for s in guide_trace.nodes.values()
                    if s["type"] == "sample")  # (K, B), gradient in phi only
        log_w = log_joint - log_q.detach()
        log_norm = log_w.logsumexp(0)  # (B,)
        wake_theta = -(log_norm - math.log(self.num_particles)).mean()
        snis = (log_w - log_norm).exp().detach()  # (K, B) self-normalized weights
        wake_phi = -(snis * log_q).sum(0).mean()
        return wake_theta, wake_phi, log_w.detach()

    def sleep(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> torch.Tensor:
        """Sleep phase: ``-mean log q(z~ | x~)`` over pairs dreamed from the model.

        ``x`` only sets the batch size B (and ``args``, e.g. labels, what to condition
        the dreams on); the guide never sees it. Dreams come as ``(S, B, ...)`` and are
        flattened to ``(S*B, ...)`` for the guide, whose plate is read from its input.
        """
        nesting = self._plate_nesting(model, guide, x, args)
        s, batch = self.num_sleep_particles, x.shape[0]
        with torch.no_grad(), pyro.plate("_sleep_particles", s, dim=-(nesting + 1)):
            dream = prune_subsample_sites(poutine.trace(poutine.uncondition(model)).get_trace(x, *args))
        obs = _single_observed_site(dream)
        x_dream = dream.nodes[obs]["value"].reshape(s * batch, *x.shape[1:])  # (S*B, ...)
        latents = {name: site["value"].reshape(s * batch, *site["value"].shape[nesting + 1:])  # (S*B, ...)
                   for name, site in dream.nodes.items()
                   if site["type"] == "sample" and name != obs and not site["infer"].get("was_observed")}
        tiled = tuple(_tile(a, s, batch) for a in args)
        guide_trace = prune_subsample_sites(
            poutine.trace(poutine.condition(guide, data=latents)).get_trace(x_dream, *tiled))
        _require_density(guide_trace)
        log_q = x_dream.new_zeros(())
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                log_q = log_q + scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"]).sum()
        return -log_q / (s * batch)

    def phases(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> PhaseLosses:
        """Both phases on one batch (wake draws first, then dreams), as separate losses."""
        wake_theta, wake_phi, log_w = self.wake(model, guide, x, *args)
        if self.insomnia == 1.0:
            guide_loss = wake_phi
        else:
            sleep_phi = self.sleep(model, guide, x, *args)
            guide_loss = sleep_phi if self.insomnia == 0.0 else self.insomnia * wake_phi + (1 - self.insomnia) * sleep_phi
        return PhaseLosses(wake_theta, guide_loss, log_w.mean().item())

    def __call__(self, model: Callable, guide: Callable, x: torch.Tensor, *args) -> torch.Tensor:
        """The loss :func:`vi_lab.fit` backpropagates: ``model_loss + guide_loss``.

        Each term reaches only its own network, so one backward pass gives the generator the
        gradient of the wake-theta loss and the recognition network that of its guide loss.
        :attr:`terms` then holds the step's monitored numbers (``train_elbo``, ``model_loss``,
        ``guide_loss``), which :func:`vi_lab.fit` averages into its history.
        """
        losses = self.phases(model, guide, x, *args)
        self.terms = {"train_elbo": losses.train_elbo, "model_loss": losses.model_loss.item(),
                      "guide_loss": losses.guide_loss.item()}
        return losses.model_loss + losses.guide_loss
