"""Encoder and decoder networks.

Every network here accepts inputs with arbitrary leading batch dimensions, so the
evaluators can push a ``(K, B, D)`` tensor of K importance samples through a decoder
in one call. Encoders map flattened images ``(..., 784)`` to a feature vector that a
guide's heads turn into posterior parameters; decoders map latents ``(..., D)`` to
the likelihood's parameters ``(..., 784)`` (logits or means).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def _as_sizes(hidden: int | Sequence[int]) -> list[int]:
    sizes = [hidden] if isinstance(hidden, int) else list(hidden)
    if any((not isinstance(h, int)) or h <= 0 for h in sizes):
        raise ValueError(f"hidden sizes must be positive integers, got {hidden!r}")
    return sizes


class MLP(nn.Module):
    """A multilayer perceptron ``in_dim -> hidden... -> out_dim``.

    :param in_dim: input features.
    :param hidden: one hidden width or a sequence of widths (``[]`` for a linear map).
    :param out_dim: output features.
    :param activation: name in :data:`ACTIVATIONS`.
    :param final_activation: apply the activation after the last layer too (for
        encoder trunks whose output feeds further heads).

    Example::

        net = MLP(784, [400], 20)
        net(torch.rand(5, 7, 784)).shape  # torch.Size([5, 7, 20])
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int | Sequence[int],
        out_dim: int,
        *,
        activation: str = "relu",
        final_activation: bool = False,
    ) -> None:
        super().__init__()
        sizes = [in_dim, *_as_sizes(hidden), out_dim]
        act = _activation(activation)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or final_activation:
                layers.append(act())
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvEncoder(nn.Module):
    """Convolutional trunk for 28x28 images: two stride-2 convolutions, then a linear map.

    :param out_dim: feature size.
    :param channels: channels of the two convolutions.
    :param image_shape: ``(C, H, W)`` of the flattened input.
    """

    def __init__(self, out_dim: int, *, channels: Sequence[int] = (32, 64), image_shape=(1, 28, 28)) -> None:
        super().__init__()
        c1, c2 = channels
        self.image_shape = tuple(image_shape)
        self.conv = nn.Sequential(
            nn.Conv2d(image_shape[0], c1, 4, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
        )
        h, w = image_shape[1] // 4, image_shape[2] // 4
        self.fc = nn.Sequential(nn.Linear(c2 * h * w, out_dim), nn.ReLU())
        self.in_dim, self.out_dim = int(torch.tensor(image_shape).prod()), out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_shape = x.shape[:-1]
        h = self.conv(x.reshape(-1, *self.image_shape))  # (prod(batch), c2, 7, 7)
        return self.fc(h.flatten(1)).reshape(*batch_shape, self.out_dim)


class ConvDecoder(nn.Module):
    """Transposed-convolution decoder mirroring :class:`ConvEncoder`.

    :param in_dim: latent size.
    :param channels: channels of the two transposed convolutions (reversed order).
    :param image_shape: ``(C, H, W)``; the output is flattened to ``(..., C*H*W)``.
    """

    def __init__(self, in_dim: int, *, channels: Sequence[int] = (32, 64), image_shape=(1, 28, 28)) -> None:
        super().__init__()
        c1, c2 = channels
        self.image_shape = tuple(image_shape)
        self.hw = (image_shape[1] // 4, image_shape[2] // 4)
        self.c2 = c2
        self.fc = nn.Sequential(nn.Linear(in_dim, c2 * self.hw[0] * self.hw[1]), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # 7 -> 14
            nn.ReLU(),
            nn.ConvTranspose2d(c1, image_shape[0], 4, stride=2, padding=1),  # 14 -> 28
        )
        self.in_dim = in_dim
        self.out_dim = int(torch.tensor(image_shape).prod())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        h = self.fc(z.reshape(-1, self.in_dim)).reshape(-1, self.c2, *self.hw)  # (prod(batch), c2, 7, 7)
        return self.deconv(h).reshape(*batch_shape, self.out_dim)


ARCHS = ("mlp", "conv")


def _conv_shape(dim: int) -> tuple[int, int, int]:
    """The ``(1, H, W)`` the conv networks read ``dim`` values as: square grey images, side a multiple of 4."""
    side = math.isqrt(dim)
    if side * side != dim or side % 4:
        raise ValueError(f"arch 'conv' reads each datapoint as a square grey image whose side is a multiple of 4 "
                         f"(28x28 for MNIST), but the data have {dim} values per datapoint; use arch 'mlp' "
                         f"(--arch mlp)")
    return (1, side, side)


def make_encoder(arch: str, in_dim: int, hidden: int | Sequence[int], out_dim: int | None = None) -> nn.Module:
    """Build an encoder trunk ``x -> features`` by architecture name.

    :param arch: ``"mlp"`` or ``"conv"``.
    :param in_dim: flattened input size (784 for MNIST).
    :param hidden: MLP hidden widths; for ``conv`` the last width is the feature size.
    :param out_dim: feature size for ``mlp`` (defaults to the last hidden width, in
        which case the trunk is the hidden stack itself).
    :returns: a module with an ``out_dim`` attribute.

    Example::

        enc = make_encoder("mlp", 784, [400])
        enc(torch.rand(3, 784)).shape  # torch.Size([3, 400])
    """
    sizes = _as_sizes(hidden)
    if arch == "mlp":
        return MLP(in_dim, sizes[:-1], out_dim or sizes[-1], final_activation=True)
    if arch == "conv":
        return ConvEncoder(out_dim or sizes[-1], image_shape=_conv_shape(in_dim))
    raise ValueError(f"unknown architecture {arch!r}; valid: {list(ARCHS)}")


def make_decoder(arch: str, latent_dim: int, hidden: int | Sequence[int], out_dim: int = 784) -> nn.Module:
    """Build a decoder ``z -> likelihood parameters`` by architecture name.

    :param arch: ``"mlp"`` or ``"conv"``.
    :param latent_dim: size of z.
    :param hidden: MLP hidden widths (reversed encoder widths are the usual choice).
    :param out_dim: output size (784 for MNIST).

    Example::

        dec = make_decoder("mlp", 20, [400])
        dec(torch.randn(10, 3, 20)).shape  # torch.Size([10, 3, 784])
    """
    sizes = _as_sizes(hidden)
    if arch == "mlp":
        return MLP(latent_dim, sizes, out_dim)
    if arch == "conv":
        return ConvDecoder(latent_dim, image_shape=_conv_shape(out_dim))
    raise ValueError(f"unknown architecture {arch!r}; valid: {list(ARCHS)}")
