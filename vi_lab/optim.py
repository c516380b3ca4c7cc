"""Adam over all of a model/guide pair's parameters in one torch optimizer.

``pyro.optim.Adam`` keeps one ``torch.optim.Adam`` per parameter tensor and steps them one
after another. On the flagship VAE (784-400-20, 10 tensors) that costs 3.9 ms a step on
one CPU thread, where torch's fused Adam over the same tensors takes 0.55 ms
(``benchmarks/step_time.py``). :class:`Adam` here steps every parameter at once, with the
same update rule, and reads and writes its state in ``pyro.optim``'s format (one
``state_dict`` per parameter name), so checkpoints move between the two.

This module sits on the objective floor (DESIGN.md): it imports nothing of vi_lab.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pyro
import pyro.optim
import torch
from pyro.params.param_store import normalize_param_name

#: Adam's settings besides the learning rate, as torch names them
DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def network_name(param_name: str) -> str:
    """The network a param-store name belongs to: ``"guide$$$encoder.0.weight"`` -> ``"guide"``."""
    return normalize_param_name(param_name).split(".", 1)[0]


def _kernel(params: list[torch.Tensor], capturable: bool) -> dict[str, bool]:
    """torch's fastest Adam implementation for these tensors: fused where it has a kernel, else foreach."""
    devices = {p.device.type for p in params}
    if all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params) and \
            devices <= {"cpu", "cuda"}:
        return {"fused": True, "capturable": capturable}
    return {"foreach": True, "capturable": capturable}


class Adam(pyro.optim.PyroOptim):
    """Adam over every parameter of the pair, in one ``torch.optim.Adam`` (fused where torch has it).

    :func:`vi_lab.fit` makes one when no ``optimizer`` is given, and :func:`vi_lab.infer.adam`
    makes one with per-network learning rates. Parameters are bound once the pair has
    used (:class:`vi_lab.step.TrainStep` finds them by tracing the first step, and again
    whenever the param store grows). The state reads and writes in
    ``pyro.optim``'s per-parameter format, so a checkpoint written by a run on
    ``pyro.optim.Adam`` resumes here and the other way round; on resume the learning
    rates given now apply (the moments and step counts are restored). It is a
    ``pyro.optim.PyroOptim``, so ``pyro.infer.SVI`` takes it too.

    :param lr: learning rate of every parameter whose network is not in ``module_lrs``.
    :param module_lrs: ``{network name: lr}`` (the name given to ``pyro.module``).
    :param capturable: keep the step counters on the device, so the step can be captured in
        a CUDA graph (fused Adam is capturable as it is).
    :param options: ``betas``, ``eps``, ``weight_decay`` as in ``torch.optim.Adam``.

    Example::

        optim = Adam(1e-3, module_lrs={"guide": 3e-3})
        vi_lab.fit(model, guide, x, optimizer=optim)
    """

    def __init__(self, lr: float = 1e-3, *, module_lrs: dict[str, float] | None = None, capturable: bool = False,
                 **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise TypeError(f"Adam got unknown options {unknown}; valid: lr, module_lrs, capturable, "
                            f"{', '.join(DEFAULTS)}")
        for name, value in (("lr", lr), *(module_lrs or {}).items()):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                    and math.isfinite(value)):
                raise ValueError(f"learning rate {name} must be a finite number >= 0, got {value!r}")
        self.lr, self.module_lrs, self.capturable = float(lr), dict(module_lrs or {}), capturable
        self.options = {**DEFAULTS, **options}
        super().__init__(torch.optim.Adam, {"lr": self.lr, **self.options})
        self.torch_optim: torch.optim.Adam | None = None
        self._names: dict[torch.Tensor, str] = {}  # bound parameter -> its param-store name
        self._pending: dict[str, dict] = {}  # state given before the parameters were bound

    def __repr__(self) -> str:
        rates = "".join(f", {k}={v:g}" for k, v in self.module_lrs.items())
        return f"vi_lab.optim.Adam(lr={self.lr:g}{rates})"

    def lr_of(self, param_name: str) -> float:
        """The learning rate of a param-store name."""
        return self.module_lrs.get(network_name(param_name), self.lr)

    # -- binding ---------------------------------------------------------------------------------

    def bind(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take on the parameters not bound yet (``(name, unconstrained tensor)`` pairs)."""
        new = [(n, p) for n, p in named if p not in self._names]
        if not new:
            return
        by_lr: dict[float, list[torch.Tensor]] = {}
        for name, p in new:
            self._names[p] = name
            by_lr.setdefault(self.lr_of(name), []).append(p)
        for lr, params in by_lr.items():
            group = {"params": params, "lr": lr, **self.options}
            if self.torch_optim is None:
                self.torch_optim = torch.optim.Adam(**group, **_kernel(params, self.capturable))
            else:
                self.torch_optim.add_param_group(group)
        if self._pending:
            self.set_state(self._pending)

    def make_capturable(self) -> None:
        """Keep the step counters on the device, so the step can be recorded in a CUDA graph."""
        self.capturable = True
        if self.torch_optim is None:
            return
        for group in self.torch_optim.param_groups:
            group["capturable"] = True
            for p in group["params"]:
                state = self.torch_optim.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    # -- stepping --------------------------------------------------------------------------------

    def step(self) -> None:
        """One Adam step of every bound parameter that has a gradient."""
        if self.torch_optim is not None:
            self.torch_optim.step()

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """``pyro.optim``'s interface, for ``pyro.infer.SVI``: bind what is new, then step."""
        store = pyro.get_param_store()
        self.bind((store.param_name(p), p) for p in params)
        self.step()

    # -- state in pyro.optim's format ------------------------------------------------------------

    def get_state(self) -> dict[str, dict]:
        """``{param name: state_dict of a one-parameter torch Adam}``, as ``pyro.optim`` writes it."""
        out = dict(self._pending)
        if self.torch_optim is None:
            return out
        for group in self.torch_optim.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                state = self.torch_optim.state.get(p)
                out[self._names[p]] = {"state": {0: dict(state)} if state else {},
                                       "param_groups": [{**settings, "params": [0]}]}
        return out

    def set_state(self, state: dict[str, dict]) -> None:
        """Restore moments and step counts by parameter name; the learning rates given now stay."""
        if self.torch_optim is None:
            self._pending = dict(state)
            return
        # state_dict() numbers the parameters in param-group order
        flat = [p for g in self.torch_optim.param_groups for p in g["params"]]
        ids = {self._names[p]: i for i, p in enumerate(flat)}
        self._pending = {k: v for k, v in state.items() if k not in ids}  # for parameters bound later
        full = self.torch_optim.state_dict()
        for name, saved in state.items():
            if name not in ids:
                continue
            if "scheduler" in saved:  # pyro.optim's format for a scheduler: no "state" key of its own
                raise ValueError(f"the saved optimizer state of {name} is a learning-rate scheduler's; "
                                 "resume it with the same pyro.optim scheduler as optimizer=")
            if saved.get("state"):
                full["state"][ids[name]] = saved["state"][0]
        # torch casts each entry to its parameter's device and dtype (fused: step counters too)
        self.torch_optim.load_state_dict(full)


__all__ = ["Adam", "network_name"]
