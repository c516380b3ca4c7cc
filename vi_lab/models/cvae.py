"""The conditional VAE p(x | z, y) p(z), by composition with :class:`VAE`.

Nothing here re-writes the VAE: :class:`CVAE` *is* a :class:`~vi_lab.models.vae.VAE`
whose decoder reads ``[z, onehot(y)]`` (the label concatenated to the latent). Its
guide q(z | x, y) is :class:`vi_lab.guides.conditional.ConditionalGuide`, any amortized
guide reading ``[x, onehot(y)]``. ``model(x, y)`` and ``guide(x, y)`` keep the
data-plate contract, so :func:`vi_lab.fit` trains them on ``(images, labels)`` pairs
and the evaluators take the labels as the extra argument.

The module also holds the check that the conditioning is used: a small digit
classifier trained on real images (:func:`train_classifier`) and the rate at which it
recognizes class c in samples generated for class c (:func:`class_agreement`).

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

from vi_lab.data import DeviceBatches
from vi_lab.labels import concat_label, one_hot
from vi_lab.models.vae import VAE
from vi_lab.nets import MLP, make_decoder


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


# ------------------------------------------------------- checking the conditioning


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, num_classes: int = 10, hidden: int | Sequence[int] = (256,),
                     epochs: int = 3, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A small MLP digit classifier (cross-entropy, Adam), to judge generated images.

    :param x: images ``(N, x_dim)`` in [0, 1].
    :param y: labels ``(N,)``.
    :returns: the trained classifier in eval mode; ``classifier(x)`` gives logits ``(B, C)``.

    Example::

        clf = train_classifier(x_train[:5000], y_train[:5000])
        (clf(x_test).argmax(-1) == y_test).float().mean()
    """
    one_hot(y, num_classes)  # validates the labels
    torch.manual_seed(seed)
    net = MLP(x.shape[-1], hidden, num_classes).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    with torch.enable_grad():  # callable from evaluation code running under no_grad
        for _ in range(epochs):
            for xb, yb in DeviceBatches(x, batch_size, shuffle=True, extra=y):
                opt.zero_grad()
                nn.functional.cross_entropy(net(xb), yb.long()).backward()
                opt.step()
    return net.eval()


@torch.no_grad()
def class_agreement(model: CVAE, classifier: nn.Module, n_per_class: int = 100) -> torch.Tensor:
    """Per class c, the fraction of samples generated for c that ``classifier`` calls c.

    Chance is 1 / C; a decoder that ignores the label scores about that on average.

    :param model: a trained :class:`CVAE`.
    :param classifier: maps images ``(B, x_dim)`` to logits ``(B, C)``.
    :param n_per_class: samples per class.
    :returns: tensor ``(C,)`` of rates in [0, 1].

    Example::

        class_agreement(cvae, train_classifier(x_train, y_train)).mean()  # chance: 0.1
    """
    device = next(model.parameters()).device
    labels = torch.arange(model.num_classes, device=device).repeat_interleave(n_per_class)  # (C*n,)
    predicted = classifier(model.sample(len(labels), labels=labels)).argmax(-1)
    return (predicted == labels).float().reshape(model.num_classes, n_per_class).mean(-1)
