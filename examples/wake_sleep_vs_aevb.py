"""Wake-sleep versus AEVB on MNIST: the shape of Kingma & Welling (2014), Figure 2.

The same VAE model/guide pair (MLP encoder and decoder, Bernoulli likelihood, dynamic
binarization) is trained with AEVB (SVI with reparameterized gradients, one ELBO for
both networks) and with wake-sleep (generator on z ~ q(z|x), recognition network on
dreams), for several latent sizes. The test ELBO is recorded at log-spaced numbers of
training samples seen, and both algorithms are drawn on one plot per latent size.

Run ``python examples/wake_sleep_vs_aevb.py`` (the defaults: latent sizes 3, 5, 10, 20,
3 epochs of 60,000 images = 180,000 training samples per run, 8 runs; 190 CPU-seconds,
under 5 minutes with ``--threads 1`` on a shared 2-core CPU) or ``--help``. It is
``vi-lab wake-sleep``: the same options and the same outputs in ``--out DIR``:
``wake_sleep_vs_aevb.png`` (the figure), ``wake_sleep_vs_aevb.json`` (every curve, final
test ELBO and importance-sampled log-likelihood, timings, the command),
``samples_by_latent_dim.png`` (prior samples of the AEVB models side by side, Kingma &
Welling's Figure 5) and ``samples_by_latent_dim_wake_sleep.png``.

What the command does for each latent size, in the library's own calls
(``vi_lab/commands/wake_sleep.py`` adds the options, the log-spaced schedule, the table
and the figures)::

    import vi_lab
    from vi_lab.infer import adam
    from vi_lab.runs import load_data

    data = load_data("mnist", binarization="dynamic")          # test set binarized once
    for loss in ("trace", "wake_sleep"):                       # AEVB, then wake-sleep: one loop
        model = vi_lab.VAE(latent_dim=10, hidden=[400])
        guide = vi_lab.make_guide("mean_field", latent_dim=10, hidden=[400])
        fit = vi_lab.fit(model, guide, data.x_train, loss=loss, epochs=3, batch_size=100,
                         optimizer=adam(1e-3, guide=1e-3),     # one rate per network
                         binarize="dynamic", eval_data=data.x_test,
                         record_at=[1000, 10_000, 100_000])    # training samples seen
        curve = [(h["samples_seen"], h["test_elbo"]) for h in fit.history]
        ll = vi_lab.log_likelihood(model, guide, data.x_test, num_samples=100)  # (N,) nats
"""

import sys

from vi_lab.commands import wake_sleep

if __name__ == "__main__":
    wake_sleep.run(sys.argv[1:], prog="python examples/wake_sleep_vs_aevb.py")
