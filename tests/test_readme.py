"""The README's custom model/guide example runs as written (with a smaller budget)."""

import re
from pathlib import Path

import pyro

README = Path(__file__).resolve().parents[1] / "README.md"


def test_custom_pair_example_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- custom-pair -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- custom-pair --> example"
    code = block.group(1)
    # same code, test-sized: fewer images and epochs, fewer importance samples
    small = (code.replace("train_size=5000, eval_size=500", "train_size=300, eval_size=30")
                 .replace("epochs=5", "epochs=2").replace("num_samples=1000", "num_samples=20"))
    assert small != code
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    exec(compile(small, "README.md:custom-pair", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    elbo = float(re.search(r"test ELBO (-?[\d.]+)", out).group(1))
    ll = float(re.search(r"test log p\(x\) (-?[\d.]+)", out).group(1))
    assert -600 < elbo < ll < 0  # a trained model, and IS tighter than the ELBO
    assert (tmp_path / "runs" / "laplace" / "last.pt").exists()
