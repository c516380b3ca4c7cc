"""Amortization gap against encoder capacity: the same decoder budget trained with mean-field encoders of several widths.

Cremer, Li & Duvenaud ("Inference Suboptimality in Variational Autoencoders", ICML 2018)
find that a larger encoder shrinks the amortization gap L[q*] - L[q], and that the decoder
adapts to the encoder it is trained with. This script trains the same VAE (same decoder
widths, seed, decoder start, data, epochs and KL warm-up) once per encoder in ``--widths``,
each with a mean-field Gaussian guide, keeps each run's checkpoint under ``--out`` (reused
when the script runs again), and on the same ``--num-points`` images of ``--split`` splits
each one's inference gap with :func:`vi_lab.gaps.inference_gaps`: log p̂(x) (K =
``--eval-samples`` importance draws from the best proposal), L[q*_rich] (a full-covariance
local guide), L[q*] (a mean-field local guide), L[q], and the approximation and
amortization gaps, in nats per datapoint.

Run ``python examples/amortization_vs_width.py --threads 1`` (the defaults are
docs/sections/amortization.md's budget) or with ``--help``. It writes ``results.json`` and
``gaps_<split>.png`` (stacked gap bars per encoder) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

import vi_lab
from vi_lab import gaps, runs
from vi_lab.data import binarize

#: settings that change a gap analysis's numbers: a cached one is reused only when they match
GAP_SETTINGS = ("num_points", "eval_samples", "max_steps", "local_particles", "rich_family")


def encoder_spec(text: str) -> list[int]:
    """``"200"`` is one hidden layer of 200 units, ``"500x500"`` two of 500."""
    try:
        widths = [int(w) for w in text.split("x")]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"an encoder is W or W1xW2... with positive widths, got {text!r}")
    return widths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python examples/amortization_vs_width.py")
    p.add_argument("--widths", type=encoder_spec, nargs="+", default=[[50], [200], [800]],
                   help="encoders' hidden widths, one per run: W (one layer) or W1xW2 (deeper); default 50 200 800")
    p.add_argument("--decoder-hidden", type=int, nargs="+", default=[400], help="decoder hidden widths, all runs")
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--kl-warmup", type=float, default=1.0,
                   help="epochs over which the latent sites' weight rises linearly from 0 to 1 (default %(default)s)")
    p.add_argument("--train-size", type=int, default=None, help="first N training images (default: all 60,000)")
    p.add_argument("--split", choices=("train", "test", "both"), default="both",
                   help="whose images the gaps are measured on (default %(default)s)")
    p.add_argument("--num-points", type=int, default=50, help="images per split (default %(default)s)")
    p.add_argument("--eval-samples", type=int, default=5000, help="K per datapoint (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=3000, help="budget of each local optimization")
    p.add_argument("--local-particles", type=int, default=16, help="ELBO draws per local step")
    p.add_argument("--rich-family", default="full_cov", help="local family of L[q*_rich] (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-progress", action="store_true", help="no bars; one line per epoch")
    p.add_argument("--out", default="runs/amortization_width", help="checkpoints, results.json and figures")
    args = p.parse_args(argv)
    for flag in ("epochs", "train_size", "num_points", "eval_samples", "max_steps", "local_particles"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.kl_warmup <= args.epochs:
        p.error(f"--kl-warmup must be between 0 and --epochs ({args.epochs}), got {args.kl_warmup}")
    gaps.check_family(args.rich_family, "--rich-family")
    return args


def label(widths: list[int]) -> str:
    return "x".join(map(str, widths))


def train(args: argparse.Namespace, widths: list[int], data: runs.RunData, device: torch.device) -> tuple:
    """The trained pair for one encoder; its checkpoint is resumed (or restored as it is) when there is one."""
    run_dir = Path(args.out) / f"enc_{label(widths)}"
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = vi_lab.VAE(latent_dim=args.latent_dim, hidden=args.decoder_hidden)  # built first: the same decoder start
    guide = vi_lab.make_guide("mean_field", latent_dim=args.latent_dim, hidden=widths)
    t0 = time.perf_counter()
    result = vi_lab.fit(model, guide, data.x_train, epochs=args.epochs, kl_warmup=args.kl_warmup,
                        batch_size=args.batch_size, lr=args.lr, binarize=data.fit_binarize, device=device,
                        seed=args.seed, checkpoint_dir=run_dir, resume=(run_dir / "last.pt").is_file(),
                        progress=runs.fit_progress(not args.no_progress))
    info = {"encoder_hidden": widths, "encoder_parameters": sum(p.numel() for p in guide.parameters()),
            "decoder_parameters": sum(p.numel() for p in model.parameters()), "epochs": len(result.history),
            "train_elbo": result.history[-1]["train_elbo"] if result.history else None,
            "train_seconds": time.perf_counter() - t0, "checkpoint": str(run_dir / "last.pt")}
    return model, guide, info


def measure(args: argparse.Namespace, model, guide, x: torch.Tensor, name: str, cache: Path) -> dict:
    """The gap report of one encoder on one split, read back from ``cache`` when its settings match."""
    settings = {k: getattr(args, k) for k in GAP_SETTINGS}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            return saved["report"]
    print(f"[{name}] gaps on {len(x)} images, K={args.eval_samples} ...", flush=True)
    report = gaps.inference_gaps(model, guide, x, family="mean_field", rich_family=args.rich_family,
                                 num_samples=args.eval_samples, max_steps=args.max_steps,
                                 num_particles=args.local_particles, label=name)
    record = report.to_dict(per_datapoint=True)
    cache.write_text(json.dumps({"settings": settings, "report": record}, indent=1))
    return record


def cell(summary: dict, key: str) -> str:
    s = summary.get(key) or {}
    if s.get("mean") is None:
        return "-"
    return f"{s['mean']:.2f}" + (f" ± {s['sem']:.2f}" if s.get("sem") is not None else "")


def table(rows: list[dict], split: str) -> str:
    header = ("encoder", "params", "log p̂(x)", "L[q*_rich]", "L[q*]", "L[q]", "approx. gap", "amort. gap",
              "inference gap", "q* steps")
    lines = [header]
    for r in rows:
        s, fit = r["gaps"][split]["summary"], r["gaps"][split]["local_fits"]["q_star"]
        lines.append((label(r["encoder_hidden"]), f"{r['encoder_parameters']:,}", *[cell(s, k) for k in (
            "log_px", "elbo_rich", "elbo_optimal", "elbo_amortized", "approximation_gap", "amortization_gap",
            "inference_gap")], f"{fit['steps']}" + ("" if fit["converged"] else " (cap)")))
    return runs.format_table(lines)


def main(argv: list[str] | None = None) -> dict:
    from vi_lab import viz  # matplotlib: imported when pictures are drawn, not for --help

    args = parse_args(argv)
    t_start = time.perf_counter()
    device = runs.setup(args.threads, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = runs.load_data("mnist", data_dir=args.data_dir, device=device, train_size=args.train_size,
                          eval_size=args.num_points, binarization="dynamic", seed=args.seed)
    splits = ["train", "test"] if args.split == "both" else [args.split]
    points = {  # training images binarized once, with a seed of their own (training saw fresh draws of them)
        "train": binarize(data.x_train[:args.num_points], "static", seed=args.seed + 2),
        "test": data.x_test[:args.num_points],  # statically binarized with seed + 1 by load_data
    }
    rows = []
    for widths in args.widths:
        model, guide, info = train(args, widths, data, device)
        info["gaps"] = {split: measure(args, model, guide, points[split], f"enc {label(widths)}, {split}",
                                       out / f"enc_{label(widths)}" / f"gaps_{split}.json") for split in splits}
        rows.append(info)

    seconds = time.perf_counter() - t_start
    for split in splits:
        print(f"\n{split} images ({len(points[split])}), nats per datapoint, mean ± sem; K={args.eval_samples}; "
              f"decoder {args.latent_dim}-{'-'.join(map(str, args.decoder_hidden))}-784, {args.epochs} epochs on "
              f"{len(data.x_train)} images, KL warm-up {args.kl_warmup:g} epochs")
        print(table(rows, split))
        reports = [{**r["gaps"][split], "label": f"mean_field\nencoder {label(r['encoder_hidden'])}"} for r in rows]
        viz.save_gap_bars(reports, out / f"gaps_{split}.png",
                          title=f"Gaps by encoder width, mean-field, {len(points[split])} {split} images")
    record = {
        "units": "nats per datapoint (ELBO and log p(x): higher is better; gaps: smaller is better)",
        "runs": rows, "splits": splits, "num_points": args.num_points, "eval_samples": args.eval_samples,
        "max_steps": args.max_steps, "local_particles": args.local_particles, "rich_family": args.rich_family,
        "latent_dim": args.latent_dim, "decoder_hidden": args.decoder_hidden, "epochs": args.epochs,
        "kl_warmup_epochs": args.kl_warmup, "train_size": len(data.x_train), "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "data_source": data.source,
        "binarization": "dynamic (training); gap images binarized once: test with seed+1, train with seed+2",
        "date": time.strftime("%Y-%m-%d"), "command": runs.command_line(), "device": str(device),
        "threads": torch.get_num_threads(), "seconds_total": seconds,
    }
    runs.write_json(out / "results.json", record)
    print(f"\ntotal {seconds / 60:.1f} min on {device} ({torch.get_num_threads()} threads); wrote {out}/ "
          f"(results.json, {', '.join(f'gaps_{s}.png' for s in splits)}, enc_<width>/last.pt)")
    return record


if __name__ == "__main__":
    with runs.user_errors():
        main()
