"""``vi-lab autoencoders``: autoencoder, denoising autoencoder and VAE side by side: decoding random latent points.

The course's demonstration: an autoencoder learns to reconstruct, but its latent space
has no distribution to sample from, so decoding a random point gives a poor image;
the VAE's prior samples are digits, because its training made N(0, I) the
distribution its decoder is used to. All three models here share the architecture
(MLP, same hidden widths and latent size), the data (dynamically binarized MNIST), the
training loop (:func:`vi_lab.fit`; an autoencoder's "ELBO" is minus its reconstruction
loss) and the reconstruction term (Bernoulli / binary cross-entropy); only the VAE has a KL.

Random latents are drawn three ways for the autoencoders: z ~ N(0, I) (the VAE's
recipe), uniform in the box the training codes span, and a Gaussian fitted to the
training codes after training. Sample quality is measured, besides the pictures, by
a Frechet distance between classifier features of the samples and of real test
digits (:mod:`vi_lab.metrics`: a classifier trained on real digits; lower is closer; the
distance between two sets of real digits is the floor).

Run ``vi-lab autoencoders`` (or ``python examples/autoencoders.py``; defaults: latent size
20, 10 epochs of 60,000 images for each model, a few minutes on a 2-core CPU) or
``vi-lab autoencoders --help``. ``--data PATH`` runs on your own data (values in [0, 1]).
Writes to ``--out DIR``: ``random_latents.png``, ``reconstructions.png`` (clean and
corrupted inputs; square grey images only), ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyro
import torch

import vi_lab
from vi_lab import evaluate, metrics, runs
from vi_lab.models.autoencoder import (
    CODE_SAMPLERS,
    CORRUPTIONS,
    RECONSTRUCTION_LOSSES,
    Autoencoder,
    random_codes,
    reconstruction_loss,
)

SAMPLER_LABELS = {"standard_normal": "z ~ N(0, I)", "box": "uniform in the code box",
                  "fitted_gaussian": "Gaussian fitted to the codes"}


@dataclass(frozen=True)
class Config(runs.CommonConfig):
    """Everything one run depends on; written into metrics.json."""

    epochs: int = 10
    latent_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    corruption: str = "gaussian"
    noise: float = 0.3
    batch_size: int = 128
    lr: float = 1e-3
    num_samples: int = 64


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab autoencoders``, declared once; ``argv`` defaults to the process's arguments."""
    p = runs.parser(__doc__, prog)
    runs.add_common_args(p, epochs=Config.epochs)
    p.add_argument("--latent-dim", type=int, default=Config.latent_dim)
    p.add_argument("--hidden", type=int, nargs="+", default=list(Config.hidden), help="hidden widths")
    p.add_argument("--corruption", choices=sorted(c for c in CORRUPTIONS if c != "none"),
                   default=Config.corruption, help="input corruption of the denoising autoencoder")
    p.add_argument("--noise", type=float, default=Config.noise,
                   help="corruption level: noise standard deviation, or masked fraction (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--num-samples", type=int, default=Config.num_samples, help="images per picture panel")
    kw = vars(p.parse_args(argv))
    kw["hidden"] = tuple(kw["hidden"])
    return Config(**kw)


class Decodes:
    """A 'sampler' for the pictures: ``sample(n)`` decodes n latent points drawn by ``draw(n)``."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], draw: Callable[[int], torch.Tensor]) -> None:
        self.decode, self.draw = decode, draw

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.decode(self.draw(n))


def loss_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An autoencoder's fit() history in its own terms: ``train_loss``/``test_loss`` (nats per image) are
    minus the ``train_elbo``/``test_elbo`` fit records (its "ELBO" is minus the reconstruction loss)."""
    renamed = {"train_elbo": "train_loss", "test_elbo": "test_loss"}
    return [{renamed.get(k, k): -v if k in renamed else v for k, v in h.items()} for h in history]


def main(cfg: Config) -> dict:
    """Train the AE, the DAE and the VAE, decode random latents, measure; write the pictures and metrics.json."""
    from vi_lab import viz  # matplotlib: imported when pictures are drawn, not for --help

    runs.one_process("autoencoders")
    device = runs.setup(cfg.threads, cfg.device)
    out = runs.out_dir(cfg.out, overwrite=cfg.overwrite)
    source = cfg.data or cfg.dataset
    data = runs.load_data(source, data_dir=cfg.data_dir, device=device, train_size=cfg.train_size,
                          eval_size=cfg.eval_size, binarization="dynamic", seed=cfg.seed)
    x_train, x_test = data.x_train, data.x_test
    x_dim, hidden = x_train.shape[1], list(cfg.hidden)
    train_kw = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, device=device, seed=cfg.seed,
                    binarize=data.fit_binarize, progress=runs.fit_progress(cfg.progress), eval_data=x_test)

    pyro.set_rng_seed(cfg.seed)  # initial weights too (torch seeds each process at random)
    ae = Autoencoder(cfg.latent_dim, hidden, loss="bce", x_dim=x_dim, name="ae")
    dae = Autoencoder(cfg.latent_dim, hidden, loss="bce", corruption=cfg.corruption, noise=cfg.noise, x_dim=x_dim,
                      name="dae")
    histories = {}
    for name, model in (("AE", ae), ("DAE", dae)):
        print(f"training the {name} (its ELBO is minus its reconstruction loss, nats per image) ...", flush=True)
        histories[name] = loss_history(vi_lab.fit(model.model, model.guide, x_train, **train_kw).history)
    vae = vi_lab.VAE(cfg.latent_dim, hidden[::-1], x_dim=x_dim)
    guide = vi_lab.make_guide("mean_field", latent_dim=cfg.latent_dim, hidden=hidden, x_dim=x_dim)
    print("training the VAE ...", flush=True)
    histories["VAE"] = vi_lab.fit(vae, guide, x_train, **train_kw).history

    # random latent points: three guesses for each autoencoder, the prior for the VAE
    generators: dict[str, Decodes] = {}
    code_stats = {}
    for name, model in (("AE", ae), ("DAE", dae)):
        with torch.no_grad():
            codes = torch.cat([model.encode(x_train[i:i + 1000]) for i in range(0, len(x_train), 1000)])
        code_stats[name] = {"mean_abs_mean": codes.mean(0).abs().mean().item(), "mean_std": codes.std(0).mean().item()}
        for kind in CODE_SAMPLERS:
            generators[f"{name}, {SAMPLER_LABELS[kind]}"] = Decodes(
                model.decode, lambda n, c=codes, k=kind: random_codes(c, n, k))
    generators["VAE, z ~ N(0, I) = p(z)"] = Decodes(vae.decode, lambda n: torch.randn(n, cfg.latent_dim, device=device))

    # the judge: a classifier trained on real grey-level digits; its hidden layer is the feature space
    raw_train = vi_lab.load_dataset(source, "train", data_dir=cfg.data_dir, device=device)
    raw_test = vi_lab.load_dataset(source, "test", data_dir=cfg.data_dir, device=device)
    n_clf = min(len(raw_train), max(len(x_train), 1000))
    num_classes = int(raw_train.labels[:n_clf].max()) + 1
    quality: dict[str, float] = {}
    if num_classes >= 2:  # data without labels (all zeros) gives the classifier nothing to learn
        classifier = metrics.train_classifier(raw_train.images[:n_clf], raw_train.labels[:n_clf],
                                              num_classes=num_classes, epochs=5, seed=cfg.seed)
        n_fd = len(x_test)
        real = raw_test.images[:n_fd]
        torch.manual_seed(cfg.seed)
        quality["real digits (training set)"] = metrics.frechet_distance(classifier.features, real,
                                                                         raw_train.images[:n_fd])
        for name, gen in generators.items():
            quality[name] = metrics.frechet_distance(classifier.features, real, gen.sample(n_fd))

    with torch.no_grad():
        vae_terms = evaluate.elbo_terms(vae, guide, x_test, num_samples=1)
    ll, ll_sem = runs.mean_sem(evaluate.log_likelihood(vae, guide, x_test, num_samples=cfg.eval_samples))
    recon = {"AE": reconstruction_loss(ae, x_test).mean().item(), "DAE": reconstruction_loss(dae, x_test).mean().item(),
             "VAE": -vae_terms["reconstruction"].mean().item()}
    # the corruption the DAE was trained to undo, applied to test digits
    corrupted = CORRUPTIONS[cfg.corruption](x_test, cfg.noise)
    with torch.no_grad():
        denoise = {name: RECONSTRUCTION_LOSSES[model.loss_name](model(corrupted), x_test).mean().item()
                   for name, model in (("AE", ae), ("DAE", dae))}

    pictures = []
    if data.drawable:
        torch.manual_seed(cfg.seed + 1)
        panels = {"AE: z ~ N(0, I)": generators["AE, z ~ N(0, I)"],
                  "AE: uniform in its code box": generators["AE, uniform in the code box"],
                  "AE: Gaussian fitted to its codes": generators["AE, Gaussian fitted to the codes"],
                  "VAE: z ~ N(0, I) = p(z)": generators["VAE, z ~ N(0, I) = p(z)"]}
        pictures.append(viz.save_sample_grids(panels, out / "random_latents.png", n=cfg.num_samples,
                                              title=f"Decoding random latent points (D = {cfg.latent_dim}, "
                                                    f"decoder means)"))
        n_show = min(10, len(x_test))
        with torch.no_grad():
            vae_recon = vae.decode(viz.posterior_mean(guide, x_test[:n_show]))
            pictures.append(viz.save_rows(
                {"input": x_test[:n_show], "AE": ae.reconstruct(x_test[:n_show]),
                 "DAE": dae.reconstruct(x_test[:n_show]), "VAE": vae_recon,
                 "corrupted input": corrupted[:n_show], "AE (corrupted)": ae.reconstruct(corrupted[:n_show]),
                 "DAE (corrupted)": dae.reconstruct(corrupted[:n_show])},
                out / "reconstructions.png", title=f"Reconstructions of {data.name} test images",
                xlabel=f"corrupted: {cfg.corruption} noise {cfg.noise}, the corruption the DAE was trained on"))

    result = {
        "frechet_distance_to_real_test_digits": quality,
        "test_reconstruction_loss": recon,
        "test_reconstruction_loss_from_corrupted_input": denoise,
        "vae_test_elbo": vae_terms["elbo"].mean().item(),
        "vae_test_kl": vae_terms["kl"].mean().item(),
        "vae_test_log_likelihood": ll,
        "vae_test_log_likelihood_sem": ll_sem,
        "code_statistics": code_stats,
        "histories": histories,
        "train_size": len(x_train),
        "eval_size": len(x_test),
        "classifier_train_size": n_clf if quality else 0,
        **runs.data_record(data),
        "device": str(device),
        "units": "reconstruction losses in nats per image (binary cross-entropy summed over pixels); "
                 "Frechet distance in classifier-feature units (lower is closer to real digits)",
        **runs.provenance(cfg),
    }
    runs.write_json(out / "metrics.json", result)
    print()
    if quality:
        print(runs.format_table([("samples from", "Frechet distance to real test digits (lower is closer)"),
                                 *[(name, f"{v:.2f}") for name, v in quality.items()]]))
    else:
        print(f"no Frechet distances: the data has no labels to train the judging classifier on ({data.name})")
    print()
    print(runs.format_table([("model", "test reconstruction loss (nats per image)",
                              f"from corrupted input ({cfg.corruption} {cfg.noise})"),
                             *[(name, f"{recon[name]:.2f}", f"{denoise[name]:.2f}" if name in denoise else "-")
                               for name in recon]]))
    print(f"\nVAE: test ELBO {result['vae_test_elbo']:.2f}, KL {result['vae_test_kl']:.2f}, "
          f"log p(x) {ll:.2f} +/- {ll_sem:.2f} (K={cfg.eval_samples}) nats per datapoint")
    print(f"AE codes: mean |E[z_i]| {code_stats['AE']['mean_abs_mean']:.2f}, mean sd(z_i) "
          f"{code_stats['AE']['mean_std']:.2f} (N(0, I) has 0 and 1)")
    written = [p.name for p in pictures] + ["metrics.json"]
    runs.report_end(data, out, written)
    return result


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab autoencoders ARGS``: parse, train, compare; user errors end in one line (exit status 1)."""
    return runs.run_command(parse_args, main, argv, prog)
