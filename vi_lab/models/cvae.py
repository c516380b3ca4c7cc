"""The conditional VAE p(x | z, y) p(z), by composition with :class:`VAE`.

Nothing here re-writes the VAE: :class:`CVAE` *is* a :class:`~vi_lab.models.vae.VAE`
whose decoder reads ``[z, onehot(y)]`` (the label concatenated to the latent). Its
guide q(z | x, y) is :class:`vi_lab.guides.conditional.ConditionalGuide`, any amortized
guide reading ``[x, onehot(y)]``. ``model(x, y)`` and ``guide(x, y)`` keep the
data-plate contract, so :func:`vi_lab.fit` trains them on ``(images, labels)`` pairs
and the evaluators take the labels as the extra argument.

Whether the conditioning is used is measured above the models, where training lives:
:func:`vi_lab.metrics.class_agreement` with a classifier trained by
:func:`vi_lab.metrics.train_classifier`.

Example::

    from vi_lab.guides.conditional import make_conditional_guide

    model = CVAE(latent_dim=10, hidden=[400])
    guide = make_conditional_guide("mean_field", latent_dim=10, hidden=[400])
    vi_lab.fit(model, guide, (x_train, y_train), epochs=10, binarize="dynamic")
    sevens = model.sample(16, labels=torch.full((16,), 7))
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from vi_lab.labels import concat_label, one_hot
from vi_lab.models.vae import VAE
from vi_lab.nets import make_decoder


class LabelConditionedDecoder(nn.Module):
    """A decoder ``z -> out`` that reads ``[z, onehot(y)]``, with y given for the duration of a call.

    :class:`VAE` calls its decoder with z alone; :meth:`given` sets the batch's labels
    around that call (and restores the previous ones after), so the VAE's model code is
    reused unchanged.

    :param net: module mapping ``(..., latent_dim + num_classes)`` to the likelihood's parameters.
    :param num_classes: C.
    """

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net, self.num_classes = net, num_classes
        self._labels: torch.Tensor | None = None

    @contextmanager
    def given(self, y: torch.Tensor) -> Iterator[None]:
        """Condition every call inside the block on labels ``y`` ``(B,)``."""
        previous, self._labels = self._labels, one_hot(y, self.num_classes)
        try:
            yield
        finally:
            self._labels = previous

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            raise RuntimeError("the CVAE decoder needs labels: call model(x, y), model.decode(z, y) or "
                               "model.sample(n, labels=...)")
        return self.net(concat_label(z, self._labels))


class CVAE(VAE):
    """Conditional VAE: ``z ~ N(0, I)``, ``x ~ likelihood(decoder([z, onehot(y)]))``, y given.

    The model is the :class:`VAE`'s, with a :class:`LabelConditionedDecoder`; the label
    is an argument (observed context), not a sample site, so the ELBO is that of
    log p(x | y).

    :param latent_dim: size of z.
    :param hidden: decoder hidden widths (MLP).
    :param num_classes: number of label values C.
    :param arch: ``"mlp"`` or ``"conv"`` (the decoder's first layer reads the label).
    :param likelihood: as for :class:`VAE`.
    :param beta: as for :class:`VAE`.
    :param x_dim: flattened observation size.
    :param name: prefix in Pyro's param store.

    Example::

        model = CVAE(latent_dim=10, hidden=[400])
        model.sample(10, labels=torch.arange(10))  # one of each digit, (10, 784)
    """

    def __init__(
        self,
        latent_dim: int = 20,
        hidden: int | Sequence[int] = (400,),
        num_classes: int = 10,
        *,
        arch: str = "mlp",
        likelihood: str | nn.Module = "bernoulli",
        beta: float = 1.0,
        x_dim: int = 784,
        name: str = "model",
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        decoder = LabelConditionedDecoder(make_decoder(arch, latent_dim + num_classes, hidden, x_dim), num_classes)
        super().__init__(latent_dim, hidden, arch=arch, likelihood=likelihood, beta=beta, x_dim=x_dim,
                         decoder=decoder, name=name)
        self.num_classes = num_classes

    def _check_batch(self, y: torch.Tensor, batch: int) -> None:
        if not torch.is_tensor(y) or y.shape[:1] != (batch,):
            raise ValueError(f"labels must have one entry per datapoint, shape ({batch},); got "
                             f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("CVAE is called as model(x, y): pass the labels (fit() does with data=(x, y))")
        self._check_batch(y, x.shape[0])
        with self.decoder.given(y):
            return super().forward(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x | z, y) for ``z`` ``(..., B, D)`` and labels ``(B,)``."""
        if y is None:
            raise ValueError("CVAE.decode needs the labels: decode(z, y)")
        with self.decoder.given(y):
            return super().decode(z)

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None, *,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """Means of p(x | z, y) for ``n`` prior draws, shape ``(n, x_dim)``.

        :param n: number of samples.
        :param labels: class of each sample ``(n,)``; default cycles 0, 1, ..., C-1, 0, ...
        """
        device = device or next(self.parameters()).device
        y = torch.arange(n, device=device) % self.num_classes if labels is None else labels.to(device)
        self._check_batch(y, n)
        return self.decode(torch.randn(n, self.latent_dim, device=device), y)

