"""The ``vi-lab`` command: one subcommand per job, each writing what its example writes.

``vi-lab train`` trains the VAE of ``examples/vae_mnist.py`` (every guide, estimator,
likelihood and variant flag), ``vi-lab gaps`` decomposes the inference gap per guide,
and so on; ``vi-lab <command> --help`` lists a command's options, declared once in its
module under :mod:`vi_lab.commands`. ``python -m vi_lab`` is the same command.

This module imports nothing heavy: the list below is all ``vi-lab --help`` needs, and a
command's module (with torch and Pyro) is imported only when that command runs.
"""

from __future__ import annotations

import importlib
import os
import sys

#: command -> (module under vi_lab.commands, one line for ``vi-lab --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a VAE (any guide, estimator, likelihood, beta) and measure it: ELBO, log p(x), pictures"),
    "eval": ("evaluate", "score a saved run: ELBO, log p(x) with K samples, k-hat; on another split or dataset"),
    "compare": ("compare", "one table across saved runs"),
    "gaps": ("gaps", "the inference gap per guide family: approximation vs amortization"),
    "estimators": ("estimators", "gradient estimators: reparameterized vs REINFORCE, baselines, discrete latents"),
    "em": ("em", "log-linear latent-class models trained by EM, against SVI and a VAE"),
    "wake-sleep": ("wake_sleep", "wake-sleep and reweighted wake-sleep against AEVB, by samples seen"),
    "cvae": ("cvae", "a conditional VAE: samples per label, checked by a classifier"),
    "autoencoders": ("autoencoders", "autoencoder and denoising autoencoder against the VAE: samples, distances"),
}

USAGE = "usage: vi-lab [-h] [--version] <command> [options]"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "A variational-inference lab on Pyro: train latent-variable models and measure how good",
             "their approximate inference is.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `vi-lab <command> --help` for a command's options. Data: --dataset mnist|fashion-mnist, or",
              "--data PATH (a .npy/.npz/.pt array, a folder of images, or torchvision:<Class>)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``vi-lab`` with ``argv`` (default: the process's arguments); returns the exit status.

    :param argv: e.g. ``["train", "--epochs", "1"]``.

    Example::

        from vi_lab.cli import main
        main(["train", "--epochs", "1", "--train-size", "200", "--out", "runs/tiny"])
    """
    try:
        return _main(argv)
    except BrokenPipeError:  # `vi-lab ... | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        from vi_lab import __version__

        print(f"vi-lab {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"{USAGE}\nvi-lab: error: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"vi_lab.commands.{COMMANDS[name][0]}")
    module.run(argv[1:], prog=f"vi-lab {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
