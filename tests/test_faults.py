"""Fault injection: training processes killed mid-epoch and mid-checkpoint-write resume bit-identically.

Each fault kills a real training subprocess with SIGKILL (no cleanup runs): at random
moments during training, in the middle of writing a checkpoint (half its bytes on disk),
and between the checkpoint and its metrics line. After every kill the checkpoint must load
(its checksums verified); at the end ``metrics.jsonl`` holds each epoch once, no temporary
file is left, and the parameters and the logged ELBOs equal an uninterrupted run's exactly.
"""

import json
import os
import random
import signal
import subprocess
import sys

import torch

from vi_lab import checkpoint

EPOCHS = 5

SCRIPT = r'''
import io, os, signal, sys, threading
import pyro, torch
from vi_lab import checkpoint, fit
from vi_lab.guides import make_guide
from vi_lab.models import VAE

out, device, fault = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
x = torch.rand(1024, 784, generator=torch.Generator().manual_seed(0)).to(device)  # grey: dynamic binarization
pyro.set_rng_seed(0)
model, guide = VAE(2, [16]), make_guide("mean_field", latent_dim=2, hidden=[16])
kind, _, arg = fault.partition(":")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "mid_write":  # the n-th checkpoint of this process: half its bytes written, then killed
    real_save, calls = torch.save, [0]

    def save(obj, f):
        calls[0] += 1
        if calls[0] < int(arg):
            return real_save(obj, f)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    checkpoint.torch.save = save
elif kind == "after_checkpoint":  # the n-th checkpoint renamed into place, then killed before its metrics line
    real_replace, calls = os.replace, [0]

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("last.pt"):
            calls[0] += 1
            if calls[0] == int(arg):
                die()

    checkpoint.os.replace = replace
elif kind == "timer":  # at a random moment
    threading.Timer(float(arg), die).start()

resume = os.path.exists(os.path.join(out, "last.pt"))
fit(model, guide, x, epochs=int(os.environ["EPOCHS"]), batch_size=32, binarize="dynamic", device=device,
    checkpoint_dir=out, resume=resume, progress=False, seed=0)
print("finished")
'''


def run(script, out, device, fault):
    env = {**os.environ, "EPOCHS": str(EPOCHS), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(out), str(device), fault], capture_output=True, text=True,
                          timeout=300, env=env)


def final_state(out):
    state = checkpoint.load(out / "last.pt")
    return state["param_store"]["params"], [(h["epoch"], h["train_elbo"]) for h in state["history"]]


def test_killed_runs_resume_bit_identically(tmp_path, device):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ref = tmp_path / "ref"
    done = run(script, ref, device, "none")
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]

    rng = random.Random(0)
    faults = ["mid_write:1", "timer:%.2f" % rng.uniform(0.3, 1.5), "after_checkpoint:1", "mid_write:2",
              "timer:%.2f" % rng.uniform(0.3, 1.5)]
    out = tmp_path / "run"
    kills = 0
    for i, fault in enumerate(faults):
        proc = run(script, out, device, fault)
        if i == 0:  # killed in the first checkpoint's write: half a temporary file, no checkpoint, no log
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            assert [p.name.endswith(".tmp") for p in out.iterdir()] == [True]
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]
        kills += proc.returncode == -signal.SIGKILL
        if (out / "last.pt").exists():
            state = checkpoint.load(out / "last.pt")  # verified: never a damaged file
            logged = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
                      if line.endswith("}")] if (out / "metrics.jsonl").exists() else []
            assert logged == list(range(1, len(logged) + 1)) and len(logged) <= state["epoch"]
        if proc.returncode == 0:
            break
    assert kills >= 3  # most faults fired before training ended
    while True:  # finish the run
        proc = run(script, out, device, "none")
        assert proc.returncode == 0, proc.stderr[-2000:]
        if "finished" in proc.stdout:
            break

    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl"]  # no temporary files
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, EPOCHS + 1))
    params, history = final_state(out)
    ref_params, ref_history = final_state(ref)
    assert history == ref_history  # every epoch's ELBO, to the last bit
    assert params.keys() == ref_params.keys()
    assert all(torch.equal(params[k], ref_params[k]) for k in params)
