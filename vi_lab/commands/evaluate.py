"""``vi-lab eval RUN_DIR``: score a saved run of ``vi-lab train`` again, on any data.

Rebuilds the run's model and guide from its ``config.json``, loads the weights of its
checkpoint ``last.pt`` and reports, per datapoint and averaged, the ELBO and the
importance-sampled log p(x) from the same K draws of the guide, and the PSIS k-hat of
those draws (above 0.7 the log p(x) estimate of a datapoint is not trustworthy). By
default it scores the run's own test split; ``--split train``, ``--dataset`` or
``--data PATH`` score other data of the same size per datapoint. Held-out data are
binarized as the run's were (:func:`vi_lab.infer.heldout_binarized`). ``--ais-steps T``
adds annealed importance sampling (:func:`vi_lab.ais.ais_log_likelihood`: ``--ais-chains``
chains per datapoint from the guide through T intermediate distributions), a tighter
log p(x) printed beside the importance-sampled one. Writes
``RUN_DIR/eval_<data>_<split>_N<size>_K<K>_s<seed>.json`` (``..._ais<C>x<T>.json`` with AIS;
or ``--out FILE``).

Under ``torchrun --nproc_per_node=N -m vi_lab eval RUN_DIR`` each process scores its share
of the datapoints (process r draws from seed ``--seed`` + r) and process 0 prints and writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from vi_lab import distributed, runs
from vi_lab.ais import ais_log_likelihood
from vi_lab.checkpoint import load as load_checkpoint
from vi_lab.commands import train
from vi_lab.data import DATASETS, load_dataset
from vi_lab.gaps import score_proposal
from vi_lab.infer import CHECKPOINT_NAME, heldout_binarized


@dataclass(frozen=True)
class Config:
    """What ``vi-lab eval`` was asked; written into its JSON."""

    run: str
    split: str = "test"
    dataset: str | None = None  # None: the run's
    data: str | None = None
    data_dir: str | None = None
    eval_size: int = 1000
    eval_samples: int = 1000
    batch_size: int = 100
    device: str | None = None
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    out: str | None = None
    ais_steps: int = 0  # 0: no AIS
    ais_chains: int = 16
    ais_leapfrog: int = 10


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The options of ``vi-lab eval``, declared once."""
    p = runs.parser(__doc__, prog)
    p.add_argument("run", metavar="RUN_DIR", help="a directory written by vi-lab train (config.json, last.pt)")
    p.add_argument("--split", choices=("test", "train"), default=Config.split)
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None, help="default: the run's dataset")
    p.add_argument("--data", default=None, metavar="PATH", help="your own data (see vi-lab train --help)")
    p.add_argument("--data-dir", default=None, help="directory with the dataset's files")
    p.add_argument("--eval-size", type=int, default=Config.eval_size, help="first N datapoints (default %(default)s)")
    p.add_argument("--eval-samples", type=int, default=Config.eval_samples,
                   help="K importance samples per datapoint (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size, help="datapoints per chunk of K draws")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--out", default=None, help="JSON file to write (default: in RUN_DIR)")
    p.add_argument("--ais-steps", type=int, default=Config.ais_steps,
                   help="also estimate log p(x) by AIS with this many intermediate distributions, e.g. 1000 "
                        "(default %(default)s: no AIS)")
    p.add_argument("--ais-chains", type=int, default=Config.ais_chains,
                   help="AIS chains per datapoint (default %(default)s)")
    p.add_argument("--ais-leapfrog", type=int, default=Config.ais_leapfrog,
                   help="leapfrog steps per AIS transition (default %(default)s)")
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.ais_steps < 0:
        p.error(f"--ais-steps must be 0 (no AIS) or a positive integer, got {cfg.ais_steps}")
    for name in ("eval_size", "eval_samples", "batch_size", "ais_chains", "ais_leapfrog"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    return cfg


def read_json(path: Path) -> dict:
    """A JSON file a run wrote; a damaged one is an error naming it, not a traceback."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not readable JSON ({err}); restore it or remove the run") from None


def load_run(run: str | Path, device: torch.device | str = "cpu") -> tuple[train.Config, torch.nn.Module, torch.nn.Module]:
    """The config, model and guide of a run of ``vi-lab train``, with the checkpoint's weights.

    :param run: the run directory.
    :param device: where to put the model and guide.
    :raises ValueError: when the directory holds no such run.

    Example::

        cfg, model, guide = load_run("runs/vae")
        vi_lab.log_likelihood(model, guide, x_test, num_samples=1000)
    """
    run = Path(run)
    config_path, ckpt_path = run / runs.CONFIG_NAME, run / CHECKPOINT_NAME
    for path in (config_path, ckpt_path):
        if not path.is_file():
            raise ValueError(f"{run} holds no run of vi-lab train: {path.name} is missing (a run directory has "
                             f"config.json and last.pt)")
    saved = read_json(config_path).get("config", {})
    fields = {f.name for f in dataclasses.fields(train.Config)}
    if not {"guide", "latent_dim", "likelihood"} <= set(saved):
        raise ValueError(f"{run} was not written by vi-lab train (its config has no guide/latent_dim/likelihood); "
                         f"vi-lab eval scores VAE runs")
    kw = {k: (tuple(v) if k == "hidden" else v) for k, v in saved.items() if k in fields}
    cfg = train.Config(**kw)
    state = load_checkpoint(ckpt_path, map_location="cpu")
    cfg = dataclasses.replace(cfg, epochs=state["epoch"])  # what the weights were trained for
    x_dim = state["settings"]["data"]["shape"][1] if state.get("settings") else 784
    pyro.clear_param_store()
    model, guide = train.build(cfg, x_dim)
    for label, module in (("model", model), ("guide", guide)):
        try:
            module.load_state_dict(state[label])
        except (RuntimeError, KeyError) as err:
            raise ValueError(f"{ckpt_path} does not fit the {label} its config.json describes: {err}") from None
    return cfg, model.to(device).eval(), guide.to(device).eval()


def main(cfg: Config) -> dict:
    device = runs.setup(cfg.threads, cfg.device)
    world, device = runs.setup_world(device)  # under torchrun: every process scores its share, rank 0 speaks
    run_cfg, model, guide = load_run(cfg.run, device)
    if cfg.out:
        out = Path(cfg.out)
        # before the work, not after
        distributed.main_decides(lambda: out.parent.mkdir(parents=True, exist_ok=True), "creating --out's directory")
    name = cfg.data or cfg.dataset or run_cfg.data or run_cfg.dataset
    ds = load_dataset(name, cfg.split, data_dir=cfg.data_dir or (run_cfg.data_dir if name == run_cfg.dataset else None),
                      device=device)
    ds = ds.subset(min(cfg.eval_size, len(ds)))
    if not cfg.out:
        ais_tag = f"_ais{cfg.ais_chains}x{cfg.ais_steps}" if cfg.ais_steps else ""
        out = Path(cfg.run) / (f"eval_{Path(ds.name).stem}_{cfg.split}_N{len(ds)}_K{cfg.eval_samples}_s{cfg.seed}"
                               f"{ais_tag}.json")
    if ds.images.shape[1] != model.x_dim:
        raise ValueError(f"the run's model takes {model.x_dim} values per datapoint; {ds.name} {cfg.split} has "
                         f"{ds.images.shape[1]}: score it on data of the run's size")
    mode = run_cfg.binarize or runs.default_binarization(run_cfg.likelihood)
    x = heldout_binarized(ds.images, mode, run_cfg.seed)  # binarized as the run's own test set was
    pyro.set_rng_seed(cfg.seed + world.rank)  # processes draw apart for their different datapoints
    t0 = time.perf_counter()
    # ELBO, log p(x) and k-hat from the same K draws per datapoint
    scored = score_proposal(model, guide, x, num_samples=cfg.eval_samples, batch_size=cfg.batch_size,
                            progress="log weights" if cfg.progress else False)
    seconds = time.perf_counter() - t0
    annealed = None
    if cfg.ais_steps:
        t1 = time.perf_counter()
        annealed = ais_log_likelihood(model, guide, x, num_chains=cfg.ais_chains, num_steps=cfg.ais_steps,
                                      leapfrog_steps=cfg.ais_leapfrog, progress="AIS" if cfg.progress else False)
        ais_seconds = time.perf_counter() - t1
    elbo, ll, khat = scored.elbo, scored.log_px, scored.khat
    finite = khat[torch.isfinite(khat)]
    result = {
        "run": str(cfg.run), "dataset": ds.name, "split": cfg.split, "data_source": ds.source,
        "data_fallback": ds.fallback,
        "eval_size": len(ds), "eval_samples": cfg.eval_samples, "binarization": mode,
        "binarization_seed": run_cfg.seed + 1, "run_epochs": run_cfg.epochs, "latent_dim": run_cfg.latent_dim,
        "elbo": dict(zip(("mean", "sem"), runs.mean_sem(elbo))),
        "log_likelihood": dict(zip(("mean", "sem"), runs.mean_sem(ll))),
        "khat_mean": finite.mean().item() if len(finite) else None,
        "khat_above_0.7": (finite > 0.7).double().mean().item() if len(finite) else None,
        "seconds": seconds, "device": str(device), "world_size": world.size, "guide": run_cfg.guide,
        "units": "nats per datapoint (higher is better)", **runs.provenance(cfg),
    }
    if annealed is not None:
        result["ais_log_likelihood"] = dict(zip(("mean", "sem"), runs.mean_sem(annealed)))
        result["ais"] = {"num_chains": cfg.ais_chains, "num_steps": cfg.ais_steps,
                         "leapfrog_steps": cfg.ais_leapfrog, "start": "guide"}
        result["ais_seconds"] = ais_seconds
        rows = [(f"AIS log p(x), {cfg.ais_chains} chains x {cfg.ais_steps} steps",
                 f"{result['ais_log_likelihood']['mean']:.2f} +/- {result['ais_log_likelihood']['sem']:.2f}")]
    else:
        rows = []
    distributed.main_decides(lambda: runs.write_json(out, result), "writing the result")
    print(runs.format_table([
        (f"{cfg.run}: {run_cfg.guide} guide, D={run_cfg.latent_dim}", "nats per datapoint"),
        (f"ELBO ({ds.name} {cfg.split}, {len(ds)} datapoints)", f"{result['elbo']['mean']:.2f} +/- "
                                                                 f"{result['elbo']['sem']:.2f}"),
        (f"log p(x), K={cfg.eval_samples}", f"{result['log_likelihood']['mean']:.2f} +/- "
                                             f"{result['log_likelihood']['sem']:.2f}"),
        *rows,
        ("PSIS k-hat: mean, share above 0.7",
         "n/a" if result["khat_mean"] is None else f"{result['khat_mean']:.2f}, {result['khat_above_0.7']:.1%}"),
    ]))
    print(f"\nwrote {out} ({seconds:.1f} s on {device})")
    if ds.fallback:
        print(f"WARNING: scored on the embedded fallback data ({ds.source}), not the full dataset: the numbers "
              f"are not comparable with published ones. Pass --data-dir or set VI_LAB_DATA.")
    return result


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``vi-lab eval RUN_DIR``; user errors end in one line (exit status 1)."""
    return runs.run_command(parse_args, main, argv, prog)
