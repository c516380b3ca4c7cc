"""Gradient estimators on MNIST: reparameterized vs REINFORCE (with baselines), and discrete latents.

Run ``python examples/reinforce_vs_reparam.py`` (defaults finish in a few minutes on a
2-core CPU) or with ``--help`` for the options. For each model family it trains the same
initial model under every estimator for the same budget (ELBO vs step and vs wall time),
then, at the parameters one reference run reached, draws ``--grad-draws`` independent
gradient estimates per estimator on one fixed batch and reports, per parameter group
(encoder = guide, decoder = model), the norm of the mean, the variance (trace of the
covariance) and the signal-to-noise ratio. The families (``--models``): ``gaussian`` (the
VAE: reparam, reinforce, reinforce_baseline), ``sbn`` (binary latents: reinforce,
reinforce_baseline, relaxed) and ``categorical`` (one K-way latent: enum, the exact
gradient, against the same).

It is ``vi-lab estimators``: the same options and the same outputs in ``--out DIR``:
``estimators.json`` (every number, with the command), ``variance.png`` and ``curves.png``.
ELBOs are in nats per datapoint, higher is better.

What the command does for one family, in the library's own calls
(``vi_lab/commands/estimators.py`` adds the options, the families, the tables and the
figures)::

    import vi_lab
    from vi_lab import gaps
    from vi_lab.data import binarize
    from vi_lab.diagnostics import gradient_stats, stats_table
    from vi_lab.estimators import Estimator
    from vi_lab.runs import format_table, load_data

    data = load_data("mnist", train_size=5000, binarization="dynamic")
    compared = [Estimator("reparam"), Estimator("reinforce_baseline", baseline="nn")]
    for est in compared:                                        # the same initial model each time
        model = vi_lab.VAE(20, [200])
        guide = vi_lab.make_guide("mean_field", latent_dim=20, hidden=[200])
        vi_lab.fit(model, guide, data.x_train, estimator=est, epochs=8, batch_size=100,
                   binarize="dynamic", eval_data=data.x_test)   # history: test ELBO per epoch
        score = gaps.score_proposal(model, guide, data.x_test, num_samples=20)  # ELBO, log p(x)
    x_fixed = binarize(data.x_train[:100], "static")            # one fixed batch
    stats = {est.label: gradient_stats(model, guide, x_fixed, estimator=est, num_draws=100)
             for est in compared}                               # at the last run's parameters
    print(format_table(stats_table(stats)))                     # ||E g||, tr Cov, SNR per group
"""

import sys

from vi_lab.commands import estimators

if __name__ == "__main__":
    estimators.run(sys.argv[1:], prog="python examples/reinforce_vs_reparam.py")
