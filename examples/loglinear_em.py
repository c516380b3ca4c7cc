"""Log-linear latent-class baseline on binarized MNIST: EM vs SVI with enumeration vs a VAE.

A mixture of Bernoullis written as a log-linear model (pixel x class indicator
features, :class:`vi_lab.models.loglinear.BernoulliMixture`) is fitted for each K in
``--classes`` twice: by exact EM (:func:`vi_lab.em.em`, best of ``--restarts``) and, as
a cross-check, by SVI on the same Pyro model with z enumerated (``TraceEnum_ELBO``, an
empty guide: its ELBO is the exact log-likelihood). A VAE (mean-field guide) is trained
on the same data. Everything sees the same statically binarized training images and is
scored on the same binarized test images: exactly for the mixtures, by importance
sampling (K = ``--eval-samples``) for the VAE.

Run ``python examples/loglinear_em.py --threads 1`` (defaults finish in a few minutes
on a 2-core CPU) or ``--help``. It is ``vi-lab em``: the same options and the same
outputs in ``--out DIR`` (default ``runs/<timestamp>/``): ``em.json``, ``templates.png``
(the EM mixtures' class templates) and ``em_curve.png`` (training log-likelihood per EM
iteration).

What the command does for one K, in the library's own calls (``vi_lab/commands/em.py``
adds the options, the VAE baseline, timings, the table and the figures)::

    import vi_lab
    from vi_lab.em import em
    from vi_lab.models.loglinear import BernoulliMixture, empty_guide, enum_elbo
    from vi_lab.runs import load_data

    data = load_data("mnist", binarization="static")       # the same binary images for all
    mixture = BernoulliMixture(10, 784)
    result = em(mixture, data.x_train, max_iters=200, restarts=3)   # exact EM, best restart kept
    exact = mixture.log_marginal(data.x_test)                       # (N,) nats, by enumeration
    other = BernoulliMixture(10, 784)                               # the same model by SVI:
    vi_lab.fit(other, empty_guide, data.x_train, loss=enum_elbo(), epochs=5, lr=0.05)
"""

import sys

from vi_lab.commands import em

if __name__ == "__main__":
    em.run(sys.argv[1:], prog="python examples/loglinear_em.py")
