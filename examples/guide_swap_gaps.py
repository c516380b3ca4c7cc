"""Train the same VAE with several guide families and split each one's inference gap.

For every family in ``--guides`` (default: mean_field, full_cov and iaf, those that are
registered) this trains the same VAE (same decoder, seed, data and epochs) or loads its
checkpoint, then on ``--num-points`` test images measures log p̂(x) (K = ``--eval-samples``
importance draws), L[q*_rich], L[q*] and L[q], the approximation and amortization gaps
(Cremer, Li & Duvenaud, 2018, Table 2), the PSIS k-hat of the importance weights, and
how much semi-amortized refinement closes the amortization gap after t steps.

Run ``python examples/guide_swap_gaps.py`` (defaults finish in under 20 minutes on a
2-core CPU with ``--threads 1``) or with ``--help``. It is ``vi-lab gaps``: the same
options and the same outputs in ``--out DIR`` (default ``runs/<timestamp>/``):
``gaps.json`` (everything, per datapoint too), ``gaps.png`` (stacked gap bars per guide),
``refinement.png`` (gap against refinement steps) and one checkpoint directory per guide
(``<guide>/last.pt``, ``<guide>/metrics.jsonl``), reused by the next run.

What the command does for each family, in the library's own calls
(``vi_lab/commands/gaps.py`` adds the options, checkpoint reuse, tables and figures)::

    import vi_lab
    from vi_lab import gaps, viz
    from vi_lab.runs import load_data

    data = load_data("mnist", binarization="dynamic")          # test set binarized once
    model = vi_lab.VAE(latent_dim=20, hidden=[400])
    guide = vi_lab.make_guide("iaf", latent_dim=20, hidden=[400])
    vi_lab.fit(model, guide, data.x_train, epochs=5, binarize="dynamic", checkpoint_dir="runs/gaps/iaf")
    report = gaps.inference_gaps(model, guide, data.x_test[:50], family="iaf", rich_family="full_cov",
                                 num_samples=5000)         # log p(x), L[q*_rich], L[q*], L[q], k-hat
    curve = gaps.refinement_curve(model, guide, data.x_test[:50], steps=(0, 10, 100), report=report)
    print(gaps.gap_table([report]))                        # nats per datapoint
    viz.save_gap_bars([report], "runs/gaps/gaps.png")
"""

import sys

from vi_lab.commands import gaps

if __name__ == "__main__":
    gaps.run(sys.argv[1:], prog="python examples/guide_swap_gaps.py")
