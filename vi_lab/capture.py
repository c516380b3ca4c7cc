"""Captured training steps: one whole step (forward, backward, Adam) recorded as a CUDA graph and replayed.

On a GPU the arithmetic of a small VAE step takes a fraction of a millisecond and Pyro's
Python bookkeeping takes the rest; a CUDA graph records the kernels one step launches and
replays them without running any Python. That works when nothing in the step talks to the
host: no value read back (``.item()``, ``bool(tensor)``, ``.tolist()``, ...), no tensor
built from Python data (a host-to-device copy), no data-dependent shapes. What this module
provides:

* :class:`SyncAudit`, a ``TorchFunctionMode`` that fails on exactly those operations, so a
  step can be checked on any device, the CPU included (the tests do);
* :func:`capture_problem`, why a :class:`vi_lab.step.TrainStep` cannot be captured (or
  ``None``);
* :class:`CapturedStep`, which copies each batch into the captured input, replays the
  graph (fresh random numbers every replay: torch's CUDA generator advances its offset)
  and runs a batch of another shape (the ragged last batch) eagerly on the same
  parameters and optimizer state.

:func:`vi_lab.fit` uses them with ``capture=True``. Only :func:`cuda_graph` needs a GPU.
"""

from __future__ import annotations

import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from vi_lab.objectives import SyncFreeTrace_ELBO
from vi_lab.optim import Adam

#: tensor methods that read a value back to the host (a device synchronization)
READS = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
                   "__complex__", "nonzero", "unique", "masked_select"})
#: factories that copy Python data (a number, a list) from the host into a new tensor
HOST_COPIES = frozenset({"tensor", "as_tensor", "new_tensor"})


class CaptureUnavailable(UserWarning):
    """``capture=True`` was asked for but the step cannot be captured: it runs eagerly instead."""


class SyncError(RuntimeError):
    """An operation inside an audited step would synchronize the device or copy from the host."""


def _where() -> str:
    """Where the offending call was written: the innermost frame outside torch (and outside Pyro, naming Pyro's)."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if "/torch/" not in f.filename and not f.filename.endswith("capture.py")]
    outside = [f for f in frames if "/pyro/" not in f.filename]
    text = lambda f: f"{f.filename}:{f.lineno} ({(f.line or '').strip()})"  # noqa: E731
    if not frames:
        return "an unknown place"
    if outside and outside[-1] is not frames[-1]:
        return f"{text(outside[-1])}, inside Pyro at {text(frames[-1])}"
    return text(frames[-1])


class SyncAudit(TorchFunctionMode):
    """Fail on any operation that would break a CUDA graph capture, on whatever device the step runs.

    Reading a value back (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``,
    ``.nonzero()``, boolean-mask indexing) and building a tensor from Python data
    (``torch.tensor(1.0)``, ``torch.as_tensor([...])``, ``t.new_tensor(...)``) raise
    :class:`SyncError` naming the operation and the line that called it.

    Example::

        with SyncAudit():
            step(x_batch)  # raises SyncError if the step would stall or break a CUDA graph
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self._fail(f"Tensor.{name}() reads a value back to the host")
        if name in HOST_COPIES and self._host_copy(name, args, kwargs):
            self._fail(f"torch.{name}(<Python data>) on the data's device copies from the host (build it "
                       f"there instead, e.g. x.new_ones(()) or torch.full(..., device=x.device))")
        if name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dtype == torch.bool:
            self._fail("indexing with a boolean mask has a data-dependent shape (use torch.where)")
        return func(*args, **kwargs)

    @staticmethod
    def _host_copy(name: str, args: tuple, kwargs: dict) -> bool:
        """A tensor made from Python data on a named device (a host-to-device copy on a GPU).

        Without a device it is a CPU tensor, which a CUDA graph does not see (Pyro's plates make
        one); with the data's device it is a copy, even when an audit runs on the CPU.
        """
        if name == "new_tensor":
            return len(args) > 1 and not torch.is_tensor(args[1])
        return bool(args) and not torch.is_tensor(args[0]) and kwargs.get("device") is not None

    @staticmethod
    def _fail(what: str) -> None:
        raise SyncError(f"{what}, at {_where()}")


def capture_problem(step: Any) -> str | None:
    """Why ``step`` (a :class:`vi_lab.step.TrainStep`) cannot be captured, or None if nothing static stops it.

    The loss must be :class:`vi_lab.objectives.SyncFreeTrace_ELBO` (fit's ``loss="trace"`` with the
    ``reparam``, ``reinforce`` or ``relaxed`` estimator) and the optimizer vi_lab's Adam; whether the
    pair itself syncs is found by running a step under :class:`SyncAudit`.
    """
    if not isinstance(step.loss, SyncFreeTrace_ELBO):
        what = type(step.loss).__name__ if not callable(step.loss) or hasattr(step.loss, "loss") else repr(step.loss)
        return (f"the objective {what} reads values back to the host inside its step (only loss='trace' with the "
                f"reparam, reinforce or relaxed estimator keeps its loss on the device)")
    if not isinstance(step.optim, Adam):
        return (f"the optimizer {type(step.optim).__name__} is a pyro.optim optimizer (one torch optimizer per "
                f"tensor); use vi_lab.infer.adam(...) or leave optimizer unset")
    return None


def audit(step: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """Run one real step under :class:`SyncAudit`; raises :class:`SyncError` on the first sync."""
    with SyncAudit():
        return step(*args)


class CapturedStep:
    """A training step replayed from a recorded graph; batches of another shape run eagerly.

    :param step: the eager step, ``step(*args) -> loss`` (a :class:`vi_lab.step.TrainStep` with
        validation done: its later calls run without Pyro's validation).
    :param example: arguments of the shape to capture (their values are copied, not kept).
    :param record: ``record(fn) -> replay``: records ``fn`` (which runs the step on the static
        inputs and returns the loss) and returns a callable that replays it: :func:`cuda_graph`
        on a GPU (after warm-up steps, see :func:`side_stream`). Tests on the CPU pass one that
        calls ``fn`` again on every replay, which exercises everything but the capture call.

    Calling the object returns the loss as a tensor that the next call overwrites: copy it
    (``losses[i].copy_(loss)``) or read it before the next step.
    """

    def __init__(self, step: Callable[..., torch.Tensor], example: tuple, record: Callable[[Callable], Callable]):
        self.step = step
        self.static = tuple(a.detach().clone() for a in example)
        self.replays = 0
        self._replay = record(lambda: step(*self.static))

    def matches(self, args: tuple) -> bool:
        return len(args) == len(self.static) and all(
            a.shape == s.shape and a.dtype == s.dtype and a.device == s.device for a, s in zip(args, self.static))

    def __call__(self, *args) -> torch.Tensor:
        if not self.matches(args):
            return self.step(*args)
        for s, a in zip(self.static, args):
            s.copy_(a)
        self.replays += 1
        return self._replay()


def cuda_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``record`` for :class:`CapturedStep` on a GPU: capture ``fn`` in a CUDA graph, return its replay.

    Warm up first, on real batches and on a side stream (:func:`side_stream`), as torch's
    whole-network capture recipe says: the allocator, cuBLAS workspaces and the optimizer's
    state must exist before the capture. Capturing records the kernels without running them.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return loss

    replay.graph = graph  # type: ignore[attr-defined]
    return replay


@contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the enclosed steps on a side CUDA stream (the warm-up before a capture); elsewhere do nothing."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def _replay_by_calling(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A stand-in ``record`` that runs ``fn`` again on every replay: everything but the capture call.

    Like a capture, recording runs nothing; each replay is one step.
    """
    return fn


#: how a step is recorded, by device type; tests on the CPU put ``_replay_by_calling`` under "cpu"
RECORDERS: dict[str, Callable[[Callable], Callable]] = {"cuda": cuda_graph}


class CaptureRun:
    """``fit(..., capture=True)``: the steps of a run, captured once they can be.

    On a device without a recorder (:data:`RECORDERS`: CUDA) it says so at once and every step
    runs eagerly. Otherwise step 1 runs eagerly with Pyro's validation; step 2 runs under
    :class:`SyncAudit`; steps 3 to ``2 + warmup`` run eagerly on a side stream (the warm-up a
    capture needs); the next step is captured (:class:`CapturedStep`) and every later step of that shape replays it.
    Where capture cannot apply (:func:`capture_problem`, a sync found by the audit, a device
    with no recorder, a capture that fails) it warns once (:class:`CaptureUnavailable`) and
    the run goes on eagerly. Once :attr:`captured` is set, the losses it returns are
    overwritten by the next replay and are not read back: the caller copies and reads them
    in bulk.

    :param step: the :class:`vi_lab.step.TrainStep`.
    :param device: the training device.
    :param warmup: eager steps on a side stream before the capture.
    """

    def __init__(self, step: Any, device: torch.device, warmup: int = 3) -> None:
        self.step, self.device, self.warmup = step, torch.device(device), warmup
        self.calls = 0
        self.captured: CapturedStep | None = None
        self.problem = capture_problem(step)
        if self.problem is None and self.device.type not in RECORDERS:
            # said before training starts, not in the middle of its progress bar
            self.problem = f"graph capture needs a CUDA device, and this run is on {self.device}"
        if self.problem is not None:
            self._give_up(self.problem)
        else:
            step.optim.make_capturable()

    @property
    def active(self) -> bool:
        return self.problem is None

    def _give_up(self, why: str) -> None:
        self.problem = why
        warnings.warn(f"capture=True: cannot capture the training step: {why}; training eagerly instead",
                      CaptureUnavailable, stacklevel=4)

    def __call__(self, *args) -> torch.Tensor:
        self.calls += 1
        if self.captured is not None:
            return self.captured(*args)
        if not self.active or self.calls == 1:
            return self.step(*args)
        if self.calls == 2:
            try:
                return audit(self.step, *args)
            except SyncError as err:
                self._give_up(f"the step synchronizes with the host: {err}")
                return self.step(*args)  # the interrupted step made no update: run it again
        if self.calls <= 2 + self.warmup:
            with side_stream(self.device):
                return self.step(*args)
        try:
            self.captured = CapturedStep(self.step, args, RECORDERS[self.device.type])
        except Exception as err:  # noqa: BLE001 (any failure of the capture leaves the eager path)
            self._give_up(f"capturing the step failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            return self.step(*args)
        return self.captured(*args)


__all__ = ["CaptureRun", "CaptureUnavailable", "CapturedStep", "RECORDERS", "SyncAudit", "SyncError", "audit",
           "capture_problem", "cuda_graph", "side_stream"]
