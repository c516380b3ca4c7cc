"""Autoencoder, denoising autoencoder and VAE side by side: decoding random latent points.

The course's demonstration: an autoencoder learns to reconstruct, but its latent space
has no distribution to sample from, so decoding a random point gives a poor image;
the VAE's prior samples are digits, because its training made N(0, I) the
distribution its decoder is used to. All three models here share the architecture
(MLP, same hidden widths and latent size), the data (dynamically binarized MNIST) and
the reconstruction term (Bernoulli / binary cross-entropy); only the VAE has a KL.

Random latents are drawn three ways for the autoencoders: z ~ N(0, I) (the VAE's
recipe), uniform in the box the training codes span, and a Gaussian fitted to the
training codes after training. Sample quality is measured, besides the pictures, by
a Frechet distance between classifier features of the samples and of real test
digits (a classifier trained on real digits; lower is closer; the distance between
two sets of real digits is the floor).

Run ``python examples/autoencoders.py`` (defaults: latent size 20, 10 epochs of 60,000
images for each model, a few minutes on a 2-core CPU) or ``--help``. It is
``vi-lab autoencoders``: the same options and the same outputs in ``--out DIR``:
``random_latents.png``, ``reconstructions.png`` (clean and corrupted inputs),
``metrics.json``.

What the command does, in the library's own calls (``vi_lab/commands/autoencoders.py``
adds the options, the three ways of drawing codes, the tables and the pictures)::

    import vi_lab
    from vi_lab import metrics
    from vi_lab.models.autoencoder import Autoencoder, random_codes
    from vi_lab.runs import load_data

    data = load_data("mnist", binarization="dynamic")
    dae = Autoencoder(20, [400], corruption="gaussian", noise=0.3)
    fit = vi_lab.fit(dae.model, dae.guide, data.x_train, epochs=10, binarize="dynamic")
    # fit.history's train_elbo is minus the reconstruction loss (nats per image)
    vae = vi_lab.VAE(20, [400])
    vi_lab.fit(vae, vi_lab.make_guide("mean_field", latent_dim=20, hidden=[400]), data.x_train,
               epochs=10, binarize="dynamic")
    judge = metrics.train_classifier(data.x_train[:1000], data.y_train[:1000])
    real = data.x_test[:1000]
    metrics.frechet_distance(judge.features, real, dae.decode(random_codes(dae.encode(data.x_train), 1000)))
    metrics.frechet_distance(judge.features, real, vae.sample(1000))     # lower is closer
"""

import sys

from vi_lab.commands import autoencoders

if __name__ == "__main__":
    autoencoders.run(sys.argv[1:], prog="python examples/autoencoders.py")
