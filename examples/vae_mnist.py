"""Train a VAE on MNIST and measure it: ELBO, importance-sampled log p(x), pictures.

Run ``python examples/vae_mnist.py`` (defaults finish in a few minutes on a 2-core CPU)
or ``python examples/vae_mnist.py --help`` for the options. It is ``vi-lab train``: the
same options and the same outputs in ``--out DIR`` (default ``runs/<timestamp>/``):
``metrics.json``, ``samples.png``, ``reconstructions.png``, ``curves.png``,
``manifold.png`` (when ``--latent-dim 2``), ``interpolation.png``, ``traversals.png``,
``edits.png``, ``latent_scatter.png``, ``metrics.jsonl``, ``config.json`` and the
checkpoint ``last.pt``. An ``--out`` that already holds files is refused unless
``--resume`` (continue that run; ``--lr`` and ``--epochs`` may change) or ``--overwrite``.

What the command does, in the library's own calls (``vi_lab/commands/train.py`` adds the
options, checks and pictures around them)::

    import vi_lab
    from vi_lab import evaluate, viz
    from vi_lab.runs import load_data

    data = load_data("mnist", binarization="dynamic")          # test set binarized once
    model = vi_lab.VAE(latent_dim=20, hidden=[400])
    guide = vi_lab.make_guide("mean_field", latent_dim=20, hidden=[400])
    result = vi_lab.fit(model, guide, data.x_train, epochs=10, binarize="dynamic",
                        eval_data=data.x_test, checkpoint_dir="runs/vae")
    ll = vi_lab.log_likelihood(model, guide, data.x_test, num_samples=1000)  # (N,) nats
    viz.save_samples(model, "runs/vae/samples.png")
"""

import sys

from vi_lab.commands import train

if __name__ == "__main__":
    train.run(sys.argv[1:], prog="python examples/vae_mnist.py")
