"""The README's custom model/guide example runs as written (with a smaller budget), on the device under test."""

import re
from pathlib import Path

import pyro

import vi_lab

README = Path(__file__).resolve().parents[1] / "README.md"


def test_custom_pair_example_trains_and_evaluates(tmp_path, monkeypatch, capsys, device):
    text = README.read_text()
    block = re.search(r"<!-- custom-pair -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- custom-pair --> example"
    code = block.group(1)
    # same code, test-sized: fewer images and epochs, fewer importance samples
    small = (code.replace("train_size=5000, eval_size=500", "train_size=300, eval_size=30")
                 .replace("epochs=5", "epochs=2").replace("num_samples=1000", "num_samples=20"))
    assert small != code
    # the example picks its device (cuda when there is one); here it gets the device under test
    assert "vi_lab.pick_device()" in code, "the custom-pair example no longer picks its device with vi_lab.pick_device()"
    monkeypatch.setattr(vi_lab, "pick_device", lambda *args, **kwargs: device)
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    namespace = {"__name__": "readme_example"}
    exec(compile(small, "README.md:custom-pair", "exec"), namespace)
    out = capsys.readouterr().out
    elbo = float(re.search(r"test ELBO (-?[\d.]+)", out).group(1))
    ll = float(re.search(r"test log p\(x\) (-?[\d.]+)", out).group(1))
    assert -600 < elbo < ll < 0  # a trained model, and IS tighter than the ELBO
    assert (tmp_path / "runs" / "laplace" / "last.pt").exists()
    # it ran there: the data and both networks
    assert namespace["data"].x_train.device.type == device.type
    for name in ("decoder", "encoder"):
        assert next(namespace[name].parameters()).device.type == device.type, name
    # the check_pair line the README shows after it gives the verdict it prints
    shown = re.search(r">>> (vi_lab\.check_pair\(model, guide, x\[:16\]\)).*\n(PairCheck\(.*\))", text)
    assert shown, "README.md lost its check_pair example"
    namespace["x"] = namespace["data"].x_test
    assert repr(eval(shown.group(1), namespace)) == shown.group(2)
