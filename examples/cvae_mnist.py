"""A conditional VAE on MNIST labels: generate any digit on demand.

The model is p(x | z, y) p(z) with the label y given to the decoder, the guide
q(z | x, y) reads it too (:mod:`vi_lab.models.cvae`: the VAE and guide composed with a
one-hot label). After training, the script draws samples for each class and checks
that the conditioning works: a small classifier trained on real training digits
labels the generated digits, and the table reports how often it agrees with the class
that was asked for (chance is 10%).

Run ``python examples/cvae_mnist.py`` (defaults: D = 2, 10 epochs of 60,000 images,
about 5 minutes on a 2-core CPU) or ``--help``; ``--digits 3 7`` picks the digits of
``digits.png``. It is ``vi-lab cvae``: the same options and the same outputs in
``--out DIR``: ``metrics.json``, ``class_grid.png`` (one column per class, one row per
shared z: the label sets the digit, z the style), ``digits.png`` (the requested digits,
one row each), ``latent_scatter.png`` (encoder means coloured by label: with the label
given, z need not encode it), ``curves.png``, and the checkpoint ``last.pt``.

What the command does, in the library's own calls (``vi_lab/commands/cvae.py`` adds the
options, the table and the pictures)::

    import torch
    import vi_lab
    from vi_lab import metrics, viz
    from vi_lab.guides.conditional import make_conditional_guide
    from vi_lab.models.cvae import CVAE
    from vi_lab.runs import load_data

    data = load_data("mnist", binarization="dynamic")          # test set binarized once
    model = CVAE(latent_dim=2, hidden=[400])
    guide = make_conditional_guide("mean_field", latent_dim=2, hidden=[400])
    vi_lab.fit(model, guide, (data.x_train, data.y_train), epochs=10, binarize="dynamic",
               eval_data=(data.x_test, data.y_test), checkpoint_dir="runs/cvae")
    ll = vi_lab.log_likelihood(model, guide, data.x_test, data.y_test, num_samples=1000)  # log p(x | y)
    judge = metrics.train_classifier(data.x_train, data.y_train, epochs=5)  # real digits only
    metrics.class_agreement(model, judge).mean()               # chance: 0.1
    viz.save_grid(model.sample(10, labels=torch.full((10,), 7)), "runs/cvae/sevens.png")
"""

import sys

from vi_lab.commands import cvae

if __name__ == "__main__":
    cvae.run(sys.argv[1:], prog="python examples/cvae_mnist.py")
