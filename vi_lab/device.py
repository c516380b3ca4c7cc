"""Which device a run uses, and the rule library code follows: tensors live where the data is.

A script picks the device once (:func:`pick_device`: ``cuda`` when there is one). Library
functions that train (``fit``, ``em``, ...) take ``device=None`` to mean *the data's
device* (:func:`resolve_device`), move the modules there, and create every tensor they
need on ``x.device``; evaluators check that the modules they run sit on the data's
device (:func:`check_modules_on`) and say how to fix it when they do not.
"""

from __future__ import annotations

from typing import Any

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``cuda`` when available and nothing else is asked for, else ``cpu``.

    :param device: ``None`` or ``"auto"`` to choose, or an explicit device.
    :raises ValueError: for a CUDA device torch cannot see, or a name torch does not know.

    Example::

        device = pick_device()  # cuda on a GPU machine, cpu elsewhere
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but torch sees no GPU; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} was asked for but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_device(device: str | torch.device | None, data: torch.Tensor) -> torch.device:
    """The device a library function runs on: ``None`` means the data's own device.

    :param device: ``None`` (follow ``data``), ``"auto"`` (:func:`pick_device`), or a device.
    :param data: the tensor the function serves.

    Example::

        resolve_device(None, x_cuda)  # device(type='cuda', index=0)
        resolve_device("cpu", x_cuda)  # device(type='cpu'): the caller asked to move
    """
    if device is None:
        return data.device
    return pick_device(device)


def check_modules_on(x: torch.Tensor, *objs: Any, what: str = "x") -> None:
    """Raise a clear error when a module among ``objs`` holds tensors on another device than ``x``.

    Plain functions are not checked (their tensors cannot be found from outside).

    :param x: the data.
    :param objs: models, guides, or anything else (non-modules are skipped).
    :param what: the data's name in the message.
    :raises ValueError: naming both devices and the move that fixes it.
    """
    for obj in objs:
        if not isinstance(obj, torch.nn.Module):
            continue
        devices = {t.device for t in (*obj.parameters(), *obj.buffers())}
        wrong = sorted(str(d) for d in devices if d != x.device)
        if wrong:
            name = type(obj).__name__
            raise ValueError(
                f"{what} is on {x.device} but the {name}'s parameters are on {', '.join(wrong)}; put both on one "
                f"device, e.g. {what} = {what}.to('{wrong[0]}') or {name.lower()}.to('{x.device}')")
