"""A conditional VAE on MNIST labels: generate any digit on demand.

The model is p(x | z, y) p(z) with the label y given to the decoder, the guide
q(z | x, y) reads it too (:mod:`vi_lab.models.cvae`: the VAE and guide composed with a
one-hot label). After training, the script draws samples for each class and checks
that the conditioning works: a small classifier trained on real training digits
labels the generated digits, and the table reports how often it agrees with the class
that was asked for (chance is 10%).

Run ``python examples/cvae_mnist.py`` (defaults: D = 2, 10 epochs of 60,000 images,
about 5 minutes on a 2-core CPU) or ``--help``; ``--digits 3 7`` picks the digits of
``digits.png``. Writes to ``--out DIR``: ``metrics.json``, ``class_grid.png`` (one
column per class, one row per shared z: the label sets the digit, z the style),
``digits.png`` (the requested digits, one row each), ``latent_scatter.png`` (encoder
means coloured by label: with the label given, z need not encode it), ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass

import pyro
import torch

import vi_lab
from vi_lab import evaluate, runs, viz
from vi_lab.guides.conditional import make_conditional_guide
from vi_lab.models.cvae import CVAE, class_agreement, train_classifier


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one run depends on; written into metrics.json."""

    epochs: int = 10
    latent_dim: int = 2  # small: z holds the style, the label the digit (with D = 10 z carries the digit too)
    hidden: tuple[int, ...] = (400,)
    digits: tuple[int, ...] = tuple(range(10))
    samples_per_digit: int = 10
    batch_size: int = 128
    lr: float = 1e-3


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_common_args(p, epochs=Config.epochs)
    p.add_argument("--latent-dim", type=int, default=Config.latent_dim)
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="hidden widths")
    p.add_argument("--digits", type=int, nargs="+", default=list(Config.digits),
                   help="digits to generate into digits.png (default all)")
    p.add_argument("--samples-per-digit", type=int, default=Config.samples_per_digit)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    kw = vars(p.parse_args(argv))
    kw["hidden"], kw["digits"] = tuple(kw["hidden"]), tuple(kw["digits"])
    cfg = Config(**kw)
    if any(not 0 <= c <= 9 for c in cfg.digits):
        p.error(f"--digits must lie in 0..9, got {list(cfg.digits)}")
    return cfg


class GivenLabels:
    """Presents q(z | x, y) as q(z | x) for the picture functions, with y aligned to x by position."""

    def __init__(self, guide: torch.nn.Module, labels: torch.Tensor) -> None:
        self.guide, self.labels = guide, labels

    def get_posterior(self, x: torch.Tensor):
        return self.guide.get_posterior(x, self.labels[: x.shape[0]])


def main(cfg: Config) -> dict:
    device = runs.setup(cfg.threads, cfg.device)
    out = runs.out_dir(cfg.out, overwrite=cfg.overwrite)
    data = runs.load_data(cfg.dataset, data_dir=cfg.data_dir, device=device, train_size=cfg.train_size,
                          eval_size=cfg.eval_size, binarization="dynamic", seed=cfg.seed)
    pyro.set_rng_seed(cfg.seed)  # initial weights too (torch seeds each process at random)
    model = CVAE(cfg.latent_dim, list(cfg.hidden)[::-1])
    guide = make_conditional_guide("mean_field", latent_dim=cfg.latent_dim, hidden=list(cfg.hidden))
    result = vi_lab.fit(model, guide, (data.x_train, data.y_train), epochs=cfg.epochs, batch_size=cfg.batch_size,
                        lr=cfg.lr, device=device, seed=cfg.seed, progress=runs.fit_progress(cfg.progress),
                        binarize=data.fit_binarize, eval_data=(data.x_test, data.y_test), checkpoint_dir=out)

    t0 = time.perf_counter()
    x_test, y_test = data.x_test, data.y_test
    elbo = evaluate.elbo(model, guide, x_test, y_test, num_samples=1)
    ll = evaluate.log_likelihood(model, guide, x_test, y_test, num_samples=cfg.eval_samples)
    # the judge: an MLP trained on the real (grey-level) training digits, never on samples
    raw = vi_lab.load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, device=device)
    n_clf = min(len(raw), max(len(data.x_train), 1000))
    classifier = train_classifier(raw.images[:n_clf], raw.labels[:n_clf], epochs=5, seed=cfg.seed)
    raw_test = vi_lab.load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, device=device)
    with torch.no_grad():
        real_accuracy = (classifier(raw_test.images[:len(x_test)]).argmax(-1) == raw_test.labels[:len(x_test)])
    agreement = class_agreement(model, classifier, n_per_class=100)
    eval_seconds = time.perf_counter() - t0

    viz.save_class_grid(model, out / "class_grid.png", title=f"CVAE samples per class (D = {cfg.latent_dim})")
    labels = torch.tensor(cfg.digits, device=device).repeat_interleave(cfg.samples_per_digit)
    viz.save_grid(model.sample(len(labels), labels=labels), out / "digits.png", nrow=cfg.samples_per_digit)
    viz.save_latent_scatter(GivenLabels(guide, y_test), x_test, y_test, out / "latent_scatter.png",
                            title="CVAE encoder means, q(z | x, y), by class")
    viz.save_curves(result.history, out / "curves.png",
                    title=f"CVAE on {cfg.dataset}: ELBO of log p(x | y) (D = {cfg.latent_dim})")

    metrics = {
        "train_elbo": result.train_elbo,
        "test_elbo": elbo.mean().item(),
        "test_log_likelihood": ll.mean().item(),
        "class_agreement": {str(c): round(a, 4) for c, a in enumerate(agreement.tolist())},
        "class_agreement_mean": agreement.mean().item(),
        "classifier_real_test_accuracy": real_accuracy.float().mean().item(),
        "classifier_train_size": n_clf,
        "eval_samples": cfg.eval_samples,
        "eval_size": len(x_test),
        "eval_seconds": eval_seconds,
        "seconds_per_epoch": result.seconds_per_epoch,
        "train_size": len(data.x_train),
        "data_source": data.source,
        "data_fallback": data.fallback,
        "device": result.device,
        "units": "nats per datapoint (higher is better); the ELBO and log-likelihood are of log p(x | y)",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": runs.command_line(),
        "config": dataclasses.asdict(cfg),
        "history": result.history,
    }
    runs.write_json(out / "metrics.json", metrics)
    print()
    print(runs.format_table([
        ("metric", "value"),
        ("test ELBO of log p(x | y) (nats per datapoint)", f"{metrics['test_elbo']:.2f}"),
        (f"test log p(x | y), K={cfg.eval_samples} (nats per datapoint)", f"{metrics['test_log_likelihood']:.2f}"),
        ("classifier accuracy on real test digits", f"{metrics['classifier_real_test_accuracy']:.3f}"),
        ("samples recognised as the class asked for (chance 0.1)", f"{metrics['class_agreement_mean']:.3f}"),
        *[(f"  digit {c}", f"{a:.2f}") for c, a in enumerate(agreement.tolist())],
        ("seconds per epoch", f"{metrics['seconds_per_epoch']:.1f} ({result.device})"),
    ]))
    print(f"\ndata: {data.source}; wrote {out}/ (metrics.json, class_grid.png, digits.png, latent_scatter.png, "
          f"curves.png{', last.pt' if result.checkpoint is not None else '; no checkpoint (0 epochs trained)'})")
    runs.print_fallback_banner(data)  # last, where it cannot be missed
    return metrics


if __name__ == "__main__":
    with runs.user_errors():
        main(parse_args())
