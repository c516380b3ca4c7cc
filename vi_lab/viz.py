"""Figures: prior samples, reconstructions, the 2-D latent manifold, training curves.

Every function writes one PNG and returns its path. Image grids go through
torchvision's ``make_grid``; plots through matplotlib's non-interactive Agg backend.
ELBOs and log-likelihoods are labelled in nats per datapoint (higher is better).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

IMAGE_SHAPE = (1, 28, 28)  # MNIST's; other square images are recognised by their size


def image_shape(x_dim: int) -> tuple[int, int, int]:
    """The ``(1, H, W)`` a flattened grey image of ``x_dim`` pixels is drawn as: square images only.

    :param x_dim: pixels per image.
    :raises ValueError: when ``x_dim`` is not a square number (vectors, or non-square images).
    """
    side = math.isqrt(x_dim)
    if side * side != x_dim:
        raise ValueError(f"cannot draw rows of {x_dim} values as pictures: only square grey images "
                         f"(H*W values with H = W) are drawn")
    return (1, side, side)


def save_figure(fig: "plt.Figure", path: str | Path, *, dpi: int = 100, tight: bool = True) -> Path:
    """Lay out, write and close a matplotlib figure (parent directories created).

    :param fig: the finished figure.
    :param path: output PNG.
    :param dpi: resolution.
    :param tight: apply ``tight_layout`` (off for grids laid out by hand to an exact pixel size).

    Example::

        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        save_figure(fig, "runs/x/plot.png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def make_grid(images: torch.Tensor, **kwargs) -> torch.Tensor:
    """torchvision's ``make_grid``, imported on first use (torchvision's import costs seconds)."""
    from torchvision.utils import make_grid as grid

    return grid(images, **kwargs)


def save_image(grid: torch.Tensor, path: str | Path) -> None:
    """torchvision's ``save_image``, imported on first use."""
    from torchvision.utils import save_image as save

    save(grid, path)


def _as_images(x: torch.Tensor, shape=None) -> torch.Tensor:
    shape = shape or image_shape(x.shape[-1])
    return x.detach().float().cpu().reshape(-1, *shape).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 8, shape=None) -> Path:
    """Save flattened images ``(N, C*H*W)`` as one grid PNG.

    :param images: values in [0, 1].
    :param path: output file.
    :param nrow: images per row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(_as_images(images, shape), nrow=nrow, padding=2, pad_value=1.0), path)
    return path


@torch.no_grad()
def posterior_mean(guide: Any, x: torch.Tensor, num_samples: int = 64) -> torch.Tensor:
    """The guide's mean of q(z | x), by Monte Carlo when the family has no closed form.

    :param guide: a guide with ``get_posterior(x)`` (every vi_lab amortized guide).
    :param x: batch ``(B, x_dim)``.
    """
    q = guide.get_posterior(x)
    try:
        return q.mean
    except NotImplementedError:  # flows: no closed-form mean
        return q.sample((num_samples,)).mean(0)


@torch.no_grad()
def save_samples(model: Any, path: str | Path, *, n: int = 64, nrow: int = 8) -> Path:
    """Decoder means of ``n`` draws z ~ p(z) (``model.sample``), as a grid.

    Example::

        save_samples(vae, "runs/x/samples.png")
    """
    return save_grid(model.sample(n), path, nrow=nrow)


@torch.no_grad()
def save_reconstructions(model: Any, guide: Any, x: torch.Tensor, path: str | Path, *, n: int = 8) -> Path:
    """Inputs (top row) over reconstructions ``decode(E_q[z | x])`` (bottom row)."""
    x = x[:n]
    recon = model.decode(posterior_mean(guide, x))
    return save_grid(torch.cat([x, recon]), path, nrow=x.shape[0])


@torch.no_grad()
def save_manifold(model: Any, path: str | Path, *, n: int = 20) -> Path:
    """Decoder means over an ``n x n`` grid of a 2-D latent space (Kingma & Welling, Fig. 4).

    The grid is uniform in (0, 1)^2 pushed through the inverse Gaussian CDF, so it
    covers the prior's mass evenly.

    :raises ValueError: when the model's latent space is not 2-D.
    """
    if getattr(model, "latent_dim", None) != 2:
        raise ValueError(f"the manifold needs a 2-D latent space, the model has {model.latent_dim} "
                         "(train with --latent-dim 2)")
    device = next(model.parameters()).device
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, device=device)
    g = torch.distributions.Normal(0.0, 1.0).icdf(u)
    # rows top to bottom run from high to low z_2, like a plot's y axis
    z = torch.stack(torch.meshgrid(g.flip(0), g, indexing="ij"), dim=-1)[..., [1, 0]].reshape(-1, 2)
    return save_grid(model.decode(z), path, nrow=n)


def save_curves(history: Sequence[dict], path: str | Path, *, keys: Sequence[str] = ("train_elbo", "test_elbo"),
                title: str = "Training curves") -> Path:
    """ELBO per epoch (nats per datapoint) for each key present in ``history``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    epochs = sorted({h["epoch"] for h in history})
    if len(epochs) <= 12:  # a tick per epoch; the locator alone puts fractions around a single epoch
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("ELBO (nats per datapoint, higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:  # no epoch trained (--epochs 0): an empty plot that says so
        ax.text(0.5, 0.5, "no epochs trained", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


def _as_record(obj: Any) -> dict:
    """A gap report or refinement curve as its JSON form (objects with ``to_dict`` or dicts)."""
    return obj.to_dict(per_datapoint=False) if hasattr(obj, "to_dict") else obj


def save_gap_bars(reports: Sequence[Any], path: str | Path, *, title: str = "Inference gap by guide family") -> Path:
    """Stacked bars per guide: approximation gap (bottom) and amortization gap (top), as in Cremer et al. (2018).

    The bar's height is the inference gap log p̂(x) - L[q]; the error bar is its
    standard error over datapoints; both segments are labelled with their means.

    :param reports: :class:`vi_lab.gaps.GapReport` objects or their ``to_dict()`` form
        (e.g. ``json.load(open("gaps.json"))["reports"]``).
    :param path: output PNG.

    Example::

        save_gap_bars([report_mean_field, report_iaf], "runs/gaps/gaps.png")
    """
    records = [_as_record(r) for r in reports]
    if not records:
        raise ValueError("save_gap_bars needs at least one report")
    labels = [r["label"] for r in records]
    approx = [r["summary"]["approximation_gap"]["mean"] for r in records]
    amort = [r["summary"]["amortization_gap"]["mean"] for r in records]
    total_sem = [r["summary"]["inference_gap"]["sem"] for r in records]
    xs = range(len(records))
    fig, ax = plt.subplots(figsize=(1.6 * len(records) + 2.5, 4))
    ax.bar(xs, approx, width=0.6, color="tab:blue", label="approximation gap  log p̂(x) - L[q*]")
    ax.bar(xs, amort, width=0.6, bottom=approx, color="tab:orange", label="amortization gap  L[q*] - L[q]")
    tops = [a + b for a, b in zip(approx, amort)]
    ax.errorbar(xs, tops, yerr=[s or 0.0 for s in total_sem], fmt="none", ecolor="black", capsize=4)
    for x, a, b in zip(xs, approx, amort):
        ax.text(x, a / 2, f"{a:.2f}", ha="center", va="center", color="white", fontsize=9)
        ax.text(x, a + b / 2, f"{b:.2f}", ha="center", va="center", color="black", fontsize=9)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_xlabel("guide family used in training")
    ax.set_ylabel("gap (nats per datapoint, lower is better)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(top=max(max(tops), 0) * 1.35 + 1e-3)
    return save_figure(fig, path)


def save_refinement_curve(curves: Sequence[Any], path: str | Path, *,
                          title: str = "Semi-amortized refinement") -> Path:
    """The amortization gap left after t local refinement steps, one line per guide.

    Curves built with a gap report carry ``amortization_gap`` (L[q*] - L[q_t]); those
    without one are drawn as the ELBO L[q_t] instead. The x axis is symmetric-log so
    t = 0 (the encoder's own q) shows.

    :param curves: :class:`vi_lab.gaps.RefinementCurve` objects or their ``to_dict()`` form.
    :param path: output PNG.

    Example::

        save_refinement_curve([curve_mean_field, curve_iaf], "runs/gaps/refinement.png")
    """
    records = [_as_record(c) for c in curves]
    if not records:
        raise ValueError("save_refinement_curve needs at least one curve")
    key = "amortization_gap" if all("amortization_gap" in r for r in records) else "elbo"
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        mean = [p["mean"] for p in r[key]]
        sem = [p["sem"] or 0.0 for p in r[key]]  # None: a single datapoint has no sem
        line, = ax.plot(r["steps"], mean, marker="o", label=r["label"])
        ax.fill_between(r["steps"], [m - s for m, s in zip(mean, sem)], [m + s for m, s in zip(mean, sem)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("refinement steps t (Adam on per-datapoint parameters, from the encoder's q)")
    if key == "amortization_gap":
        ax.set_ylabel("L[q*] - L[q_t] (nats per datapoint)")
        ax.axhline(0, color="black", linewidth=0.8)
    else:
        ax.set_ylabel("ELBO L[q_t] (nats per datapoint, higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


# --------------------------------------------------------------- latent-space pictures
# Image grids below are matplotlib figures of a fixed size (titles, row and column
# labels), laid out by hand rather than by tight_layout so the pixel size is exact:
# ``(GRID_MARGINS[0] + cols * CELL_INCHES) * dpi`` wide, ``(GRID_MARGINS[1] + rows * CELL_INCHES) * dpi`` high.

CELL_INCHES = 0.5
#: extra width (row labels, right edge) and height (title, column labels, x label), inches
GRID_MARGINS = (1.0, 1.0)


def _save_labelled_grid(images: torch.Tensor, path: str | Path, *, rows: int, cols: int, title: str,
                        row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                        xlabel: str | None = None, ylabel: str | None = None, dpi: int = 100,
                        shape=None) -> Path:
    """Lay ``rows * cols`` flattened images (row-major) out as one titled, labelled figure."""
    shape = shape or image_shape(images.shape[-1])
    pad, h, w = 2, shape[1], shape[2]
    grid = make_grid(_as_images(images, shape), nrow=cols, padding=pad, pad_value=1.0)  # (C, H', W')
    width, height = GRID_MARGINS[0] + cols * CELL_INCHES, GRID_MARGINS[1] + rows * CELL_INCHES
    fig = plt.figure(figsize=(width, height))
    left, bottom = 0.85, 0.5  # inches: room for row labels / column labels and x label
    ax = fig.add_axes((left / width, bottom / height, cols * CELL_INCHES / width, rows * CELL_INCHES / height))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="auto")
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(cols)])
    ax.set_xticklabels(list(col_labels) if col_labels is not None else [""] * cols, fontsize=7)
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(rows)])
    ax.set_yticklabels(list(row_labels) if row_labels is not None else [""] * rows, fontsize=7)
    ax.tick_params(length=0)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=9, y=1 - 0.12 / height, va="top")
    return save_figure(fig, path, dpi=dpi, tight=False)


def _latent_dim(model: Any) -> int:
    dim = getattr(model, "latent_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"the model needs an integer latent_dim attribute, got {dim!r}")
    return dim


@torch.no_grad()
def save_interpolation(model: Any, guide: Any, x_start: torch.Tensor, x_end: torch.Tensor, path: str | Path, *,
                       steps: int = 8, title: str = "Latent interpolation") -> Path:
    """Decode ``z = (1 - t) z_a + t z_b`` between the encoder means of pairs of images.

    One row per pair: the first image, ``steps`` decodes for t from 0 to 1 (the ends are
    reconstructions), the second image.

    :param model: a model with ``decode(z)``.
    :param guide: a guide with ``get_posterior(x)``.
    :param x_start: first images of the pairs ``(P, x_dim)``.
    :param x_end: second images ``(P, x_dim)``.
    :param steps: interpolation points, ends included (>= 2).
    :param path: output PNG, ``(1.0 + 0.5 (steps + 2)) x (1.0 + 0.5 P)`` inches at 100 dpi.

    Example::

        save_interpolation(vae, guide, x_test[:4], x_test[4:8], "runs/x/interpolation.png")
    """
    if x_start.shape != x_end.shape or x_start.dim() != 2:
        raise ValueError(f"x_start and x_end must both be (P, x_dim), got {tuple(x_start.shape)} and {tuple(x_end.shape)}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
    z_a, z_b = posterior_mean(guide, x_start), posterior_mean(guide, x_end)  # (P, D)
    t = torch.linspace(0, 1, steps, device=z_a.device).reshape(1, steps, 1)
    z = (1 - t) * z_a.unsqueeze(1) + t * z_b.unsqueeze(1)  # (P, steps, D)
    decoded = model.decode(z)  # (P, steps, x_dim)
    rows = torch.cat([x_start.unsqueeze(1), decoded, x_end.unsqueeze(1)], dim=1)  # (P, steps + 2, x_dim)
    cols = [f"{v:.2g}" for v in t.flatten().tolist()]
    return _save_labelled_grid(rows.reshape(-1, rows.shape[-1]), path, rows=x_start.shape[0], cols=steps + 2,
                               title=title, col_labels=["image a", *cols, "image b"],
                               xlabel="t in z = (1 - t) z_a + t z_b (z: encoder mean)")


def _active_dims(guide: Any, x: torch.Tensor, k: int) -> list[int]:
    """The k latent coordinates whose encoder means vary most over ``x`` (the ones in use)."""
    means = posterior_mean(guide, x)
    spread = means.var(0) if means.shape[0] > 1 else means.abs()[0]
    return spread.argsort(descending=True)[:k].tolist()


@torch.no_grad()
def save_traversals(model: Any, guide: Any, x: torch.Tensor, path: str | Path, *, dims: Sequence[int] | None = None,
                    span: float = 3.0, steps: int = 9, max_dims: int = 8,
                    title: str = "Latent traversals") -> Path:
    """Vary one latent coordinate at a time over ``[-span, span]``, the others fixed at x[0]'s encoding.

    :param model: a model with ``decode(z)`` and ``latent_dim``.
    :param guide: a guide with ``get_posterior(x)``.
    :param x: images ``(B, x_dim)``; the first is the base point, the batch picks default dims.
    :param dims: coordinates to vary (one row each); default: the ``max_dims`` whose encoder
        means vary most over ``x``.
    :param span: range of the varied coordinate (prior standard deviations).
    :param steps: values per row.
    :param path: output PNG, ``(1.0 + 0.5 steps) x (1.0 + 0.5 len(dims))`` inches at 100 dpi.

    Example::

        save_traversals(vae, guide, x_test[:500], "traversals.png", dims=[0, 3], span=2.5)
    """
    d = _latent_dim(model)
    dims = list(dims) if dims is not None else _active_dims(guide, x, min(max_dims, d))
    if not dims or any(not 0 <= i < d for i in dims):
        raise ValueError(f"dims must be a non-empty list of coordinates in [0, {d - 1}], got {dims}")
    base = posterior_mean(guide, x[:1])[0]  # (D,)
    values = torch.linspace(-span, span, steps, device=base.device)
    z = base.repeat(len(dims), steps, 1)  # (rows, steps, D)
    for row, i in enumerate(dims):
        z[row, :, i] = values
    images = model.decode(z).reshape(len(dims) * steps, -1)
    return _save_labelled_grid(images, path, rows=len(dims), cols=steps, title=title,
                               row_labels=[f"z_{i + 1}" for i in dims],
                               col_labels=[f"{v:.1f}" for v in values.tolist()],
                               xlabel="value of the varied coordinate (others: encoder mean of one image)")


@torch.no_grad()
def save_edits(model: Any, guide: Any, x: torch.Tensor, path: str | Path, *, edits: dict[int, float] | None = None,
               n: int = 8, title: str = "Image editing in latent space") -> Path:
    """Encode, change chosen coordinates, decode: inputs, reconstructions and edited decodes.

    :param model: a model with ``decode(z)`` and ``latent_dim``.
    :param guide: a guide with ``get_posterior(x)``.
    :param x: images ``(B, x_dim)``; the first ``n`` are edited.
    :param edits: ``{coordinate: shift}`` added to the encoder mean; default: +2 on the
        coordinate whose means vary most over ``x``.
    :param n: images shown.
    :param path: output PNG, ``(1.0 + 0.5 n) x (1.0 + 0.5 * 3)`` inches at 100 dpi.

    Example::

        save_edits(vae, guide, x_test[:100], "edits.png", edits={3: 2.0, 7: -1.5})
    """
    d = _latent_dim(model)
    edits = dict(edits) if edits is not None else {_active_dims(guide, x, 1)[0]: 2.0}
    if not edits or any(not 0 <= i < d for i in edits):
        raise ValueError(f"edits must map coordinates in [0, {d - 1}] to shifts, got {edits}")
    x = x[:n]
    z = posterior_mean(guide, x)  # (n, D)
    z_edit = z.clone()
    for i, shift in edits.items():
        z_edit[:, i] += shift
    images = torch.cat([x, model.decode(z), model.decode(z_edit)])
    change = ", ".join(f"z_{i + 1} {shift:+g}" for i, shift in edits.items())
    return _save_labelled_grid(images, path, rows=3, cols=x.shape[0], title=title,
                               row_labels=["input", "reconstruction", "edited"],
                               xlabel=f"edit: {change} (added to the encoder mean)")


@torch.no_grad()
def save_class_grid(model: Any, path: str | Path, *, n_styles: int = 8, classes: Sequence[int] | None = None,
                    title: str = "Samples per class") -> Path:
    """Conditional samples: one column per class, one row per shared latent draw z ("style").

    :param model: a conditional model with ``decode(z, y)``, ``latent_dim`` and ``num_classes``
        (e.g. :class:`vi_lab.models.cvae.CVAE`).
    :param n_styles: rows, each a draw z ~ N(0, I) decoded with every class.
    :param classes: the classes shown (default all).
    :param path: output PNG, ``(1.0 + 0.5 len(classes)) x (1.0 + 0.5 n_styles)`` inches at 100 dpi.

    Example::

        save_class_grid(cvae, "classes.png", n_styles=4, classes=[3, 5, 8])
    """
    classes = list(range(model.num_classes)) if classes is None else list(classes)
    device = next(model.parameters()).device
    # (rows, cols, D): the classes are the batch dimension the labels line up with
    z = torch.randn(n_styles, 1, _latent_dim(model), device=device).expand(-1, len(classes), -1)
    images = model.decode(z, torch.tensor(classes, device=device))  # (rows, cols, x_dim)
    return _save_labelled_grid(images.reshape(n_styles * len(classes), -1), path, rows=n_styles, cols=len(classes),
                               title=title, col_labels=[str(c) for c in classes],
                               row_labels=[f"z #{i + 1}" for i in range(n_styles)],
                               xlabel="class y (each row: one z ~ N(0, I))")


@torch.no_grad()
def save_latent_scatter(guide: Any, x: torch.Tensor, labels: torch.Tensor, path: str | Path, *,
                        title: str = "Encoder means by class", dpi: int = 100) -> Path:
    """Scatter of the encoder means of ``x`` coloured by label; PCA to 2-D when D > 2.

    :param guide: a guide with ``get_posterior(x)``.
    :param x: images ``(B, x_dim)``.
    :param labels: integer labels ``(B,)``.
    :param path: output PNG, 6 x 5 inches.

    Example::

        save_latent_scatter(guide, x_test[:2000], y_test[:2000], "scatter.png")
    """
    if labels.shape[:1] != x.shape[:1]:
        raise ValueError(f"labels must have one entry per image, shape ({x.shape[0]},); got {tuple(labels.shape)}")
    means = posterior_mean(guide, x).detach().double().cpu()  # (B, D)
    d = means.shape[-1]
    if d < 2:
        raise ValueError(f"the scatter needs at least 2 latent dimensions, the guide has {d}")
    if d == 2:
        points, axes = means, ("z_1 (encoder mean)", "z_2 (encoder mean)")
    else:
        centred = means - means.mean(0)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ vh[:2].T  # (B, 2) scores on the first two principal axes
        share = (s**2 / (s**2).sum().clamp_min(1e-300))[:2].tolist()
        if points.shape[1] < 2:  # a single image has one principal axis: the second score is 0
            points = torch.cat([points, points.new_zeros(len(points), 2 - points.shape[1])], 1)
            share += [0.0] * (2 - len(share))
        axes = tuple(f"PC {i + 1} of the encoder means ({100 * v:.0f}% of variance)" for i, v in enumerate(share))
    fig, ax = plt.subplots(figsize=(6, 5))
    labels = labels.cpu()
    cmap = plt.get_cmap("tab10")
    for k, c in enumerate(sorted(set(labels.tolist()))):
        sel = labels == c
        ax.scatter(points[sel, 0].numpy(), points[sel, 1].numpy(), s=4, alpha=0.6, color=cmap(k % 10), label=str(c))
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title + (f" (D = {d}, PCA)" if d > 2 else " (D = 2)"))
    ax.legend(title="label", markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.subplots_adjust(left=0.12, right=0.84, bottom=0.11, top=0.92)
    return save_figure(fig, path, dpi=dpi, tight=False)


@torch.no_grad()
def save_sample_grids(models: dict[str, Any], path: str | Path, *, n: int = 64, nrow: int = 8,
                      title: str = "Samples from the prior", panel_inches: float = 2.4, dpi: int = 100) -> Path:
    """Prior samples of several models side by side, one titled panel each (Kingma & Welling, Fig. 5).

    :param models: panel title -> model with ``sample(n)``, e.g. ``{"D = 2": vae2, "D = 20": vae20}``.
    :param n: samples per panel.
    :param nrow: images per row within a panel.
    :param path: output PNG, ``(panel_inches * len(models)) x (panel_inches + 0.6)`` inches.

    Example::

        save_sample_grids({f"D = {d}": vaes[d] for d in (2, 5, 10)}, "samples_by_d.png")
    """
    if not models:
        raise ValueError("models must name at least one model")
    k = len(models)
    fig, axes = plt.subplots(1, k, figsize=(panel_inches * k, panel_inches + 0.6), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        grid = make_grid(_as_images(model.sample(n)), nrow=nrow, padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.55 / (panel_inches + 0.6), wspace=0.05)
    return save_figure(fig, path, dpi=dpi, tight=False)


def save_bound_curves(panels: dict[str, dict[str, Sequence[tuple[float, float]]]], path: str | Path, *,
                      styles: dict[str, dict] | None = None, title: str = "Lower bound during training",
                      xlabel: str = "training samples evaluated", logx: bool = True,
                      ylabel: str = "ELBO (nats per datapoint, higher is better)",
                      ylim: tuple[float, float] | None = None,
                      panel_inches: tuple[float, float] = (3.3, 3.2), dpi: int = 100) -> Path:
    """Curves of a bound against training progress, one panel per setting (Kingma & Welling, Fig. 2).

    :param panels: panel title -> series label -> points ``(x, y)``, e.g.
        ``{"D = 3": {"AEVB, test": [(1e3, -200.0), ...], "wake-sleep, test": [...]}}``.
    :param styles: series label -> matplotlib line keywords (same label, same style in every panel).
    :param logx: logarithmic x axis (as in the paper).
    :param ylim: y range shared by the panels (default: all points).
    :param path: output PNG, ``(panel_inches[0] * len(panels)) x (panel_inches[1] + 0.5)`` inches.

    Example::

        points = [(h["samples_seen"], h["test_elbo"]) for h in result.history]
        save_bound_curves({"D = 10": {"AEVB, test": points}}, "bound.png")
    """
    if not panels:
        raise ValueError("panels must hold at least one panel")
    styles = styles or {}
    k = len(panels)
    fig, axes = plt.subplots(1, k, figsize=(panel_inches[0] * k, panel_inches[1] + 0.5), squeeze=False, sharey=True)
    handles: dict[str, Any] = {}
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            if not points:
                continue
            xs, ys = zip(*points)
            (line,) = ax.plot(xs, ys, label=label, **{"marker": "o", "ms": 2.5, **styles.get(label, {})})
            handles.setdefault(label, line)
        if logx:
            ax.set_xscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(4, len(handles)),
               fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    width, height = panel_inches[0] * k, panel_inches[1] + 0.5
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.1 / width, top=1 - 0.5 / height, bottom=0.9 / height,
                        wspace=0.08)
    return save_figure(fig, path, dpi=dpi, tight=False)


@torch.no_grad()
def save_rows(rows: dict[str, torch.Tensor], path: str | Path, *, title: str, xlabel: str | None = None,
              col_labels: Sequence[str] | None = None) -> Path:
    """Rows of images with a label each (e.g. inputs, reconstructions of several models).

    :param rows: row label -> images ``(n, x_dim)``; every row has the same n.
    :param title: figure title.
    :param xlabel: caption under the grid.
    :param path: output PNG, ``(1.0 + 0.5 n) x (1.0 + 0.5 len(rows))`` inches at 100 dpi.

    Example::

        save_rows({"input": x[:8], "AE": ae.reconstruct(x[:8])}, "recon.png", title="Reconstructions")
    """
    if not rows:
        raise ValueError("rows must hold at least one row of images")
    sizes = {label: images.shape[0] for label, images in rows.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every row needs the same number of images, got {sizes}")
    n = next(iter(sizes.values()))
    return _save_labelled_grid(torch.cat([r.reshape(n, -1) for r in rows.values()]), path, rows=len(rows), cols=n,
                               title=title, row_labels=list(rows), col_labels=col_labels, xlabel=xlabel)


def save_templates(models: dict[int, Any], path: str | Path, ncol: int = 10) -> Path:
    """Each mixture's templates ``sigmoid(W_k)``, ordered by mixing weight, one panel per K.

    :param models: K -> a fitted :class:`vi_lab.models.loglinear.BernoulliMixture`.
    :param path: output PNG.
    """
    fig, axes = plt.subplots(len(models), 1, squeeze=False,
                             figsize=(ncol * 0.75, sum(0.75 * -(-K // ncol) + 0.35 for K in models)),
                             gridspec_kw={"height_ratios": [-(-K // ncol) for K in models]})
    for ax, (K, model) in zip(axes[:, 0], models.items()):
        order = model.log_prior().argsort(descending=True)
        templates = model.templates()[order].detach().cpu()
        images = templates.reshape(-1, *image_shape(templates.shape[-1]))  # (K, 1, H, W)
        grid = make_grid(images, nrow=min(ncol, K), padding=2, pad_value=1.0)[0]
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        pi = model.log_prior().exp()[order]
        ax.set_title(f"K={K} (EM): class templates, mixing weights {pi.max().item():.3f} ... {pi.min().item():.3f}",
                     fontsize=9)
        ax.axis("off")
    return save_figure(fig, path)


def save_em_curves(results: dict[int, Any], path: str | Path) -> Path:
    """Training log-likelihood per EM iteration: every restart (thin), the kept one (thick).

    :param results: K -> the result of :func:`vi_lab.em.em` (its ``runs`` and ``best``).
    :param path: output PNG.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    lows = []
    for i, (K, result) in enumerate(results.items()):
        color = f"C{i}"
        for j, run in enumerate(result.runs):
            kept = j == result.best
            ax.plot(range(len(run.log_likelihoods)), run.log_likelihoods, color=color, lw=2 if kept else 0.8,
                    alpha=1.0 if kept else 0.5, label=f"K={K} (best of {len(result.runs)})" if kept else None)
            lows.extend(run.log_likelihoods[1:2])
    if lows:  # iteration 0 (the random start) is far below; keep the interesting range in view
        ax.set_ylim(bottom=min(lows) - 2)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("train log-likelihood (nats per datapoint,\nhigher is better)")
    ax.set_title("Bernoulli mixtures fitted by EM (exact log p(x))")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
