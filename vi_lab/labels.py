"""Class labels as network input: one-hot rows, appended to latents or images.

The conditioning input of a conditional VAE's decoder (``[z, onehot(y)]``,
:mod:`vi_lab.models.cvae`) and of its guide (``[x, onehot(y)]``,
:mod:`vi_lab.guides.conditional`). On the ground floor (DESIGN.md), so that the model
and the guide, which are siblings, share it without importing each other.
"""

from __future__ import annotations

import torch
from torch import nn


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer labels ``(B,)`` to one-hot rows ``(B, num_classes)``, with a clear error for bad labels.

    :param y: integer class labels.
    :param num_classes: number of classes C.
    :param dtype: floating type of the result.

    Example::

        one_hot(torch.tensor([2, 0]), 3)  # tensor([[0., 0., 1.], [1., 0., 0.]])
    """
    if not torch.is_tensor(y) or y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor (B,), got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}"
                         f"{' of floats' if torch.is_tensor(y) and y.is_floating_point() else ''}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")
    return nn.functional.one_hot(y.long(), num_classes).to(dtype)


def concat_label(t: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
    """Append one-hot labels ``(B, C)`` to ``t`` of shape ``(..., B, d)``, giving ``(..., B, d + C)``.

    The labels broadcast over ``t``'s leading dimensions (importance particles, dreams).

    :param t: latents or images, batch last but one.
    :param y_onehot: one row per datapoint of the batch.

    Example::

        concat_label(torch.zeros(5, 4, 2), one_hot(torch.arange(4) % 3, 3)).shape  # (5, 4, 5)
    """
    lab = y_onehot.to(t.dtype).expand(*t.shape[:-1], y_onehot.shape[-1])  # (..., B, C)
    return torch.cat([t, lab], dim=-1)


__all__ = ["concat_label", "one_hot"]
