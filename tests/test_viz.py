"""Picture functions: each writes a non-empty PNG of the expected pixel size, and the
latent-space pictures decode the latent points they claim to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vi_lab import viz
from vi_lab.guides import make_guide
from vi_lab.models import VAE
from vi_lab.models.cvae import CVAE



@pytest.fixture
def pair(device):
    return VAE(3, [16]).to(device), make_guide("mean_field", latent_dim=3, hidden=[16]).to(device)


@pytest.fixture
def x(device):
    return torch.rand(12, 784, device=device)


def size_of(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 1000, f"{path.name} is (nearly) empty"
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# Grid pictures are (1.0 + 0.5 cols) x (1.0 + 0.5 rows) inches at 100 dpi.
def test_interpolation_png(tmp_path, pair, x):
    path = viz.save_interpolation(*pair, x[:2], x[2:4], tmp_path / "interp.png", steps=6)
    assert size_of(path) == (500, 200)  # 2 pairs x (6 steps + the two images)


def test_traversals_png(tmp_path, pair, x):
    assert size_of(viz.save_traversals(*pair, x, tmp_path / "t.png", dims=[0, 2], steps=5)) == (350, 200)
    assert size_of(viz.save_traversals(*pair, x, tmp_path / "t3.png", steps=5)) == (350, 250)  # all 3 dims


def test_edits_png(tmp_path, pair, x):
    assert size_of(viz.save_edits(*pair, x, tmp_path / "e.png", edits={1: 2.0}, n=4)) == (300, 250)


def test_class_grid_png(tmp_path, device):
    model = CVAE(3, [16], num_classes=4).to(device)
    assert size_of(viz.save_class_grid(model, tmp_path / "c.png", n_styles=2, classes=[0, 1, 3])) == (250, 200)


def test_rows_png(tmp_path, x):
    path = viz.save_rows({"a": x[:3], "b": x[3:6]}, tmp_path / "r.png", title="rows")
    assert size_of(path) == (250, 200)
    with pytest.raises(ValueError, match="same number of images"):
        viz.save_rows({"a": x[:3], "b": x[3:5]}, tmp_path / "bad.png", title="rows")


@pytest.mark.parametrize("latent_dim", [2, 5])
def test_latent_scatter_png(tmp_path, x, latent_dim):
    guide = make_guide("mean_field", latent_dim=latent_dim, hidden=[16]).to(x.device)
    labels = torch.arange(12, device=x.device) % 3
    assert size_of(viz.save_latent_scatter(guide, x, labels, tmp_path / "s.png")) == (600, 500)


def test_sample_grids_png(tmp_path, device):
    models = {"D = 2": VAE(2, [16]).to(device), "D = 5": VAE(5, [16]).to(device)}
    assert size_of(viz.save_sample_grids(models, tmp_path / "g.png", n=16, nrow=4)) == (480, 300)


def test_bound_curves_png(tmp_path):
    panels = {"D = 3": {"AEVB, test": [(1e3, -200.0), (1e4, -150.0)], "wake-sleep, test": [(1e3, -250.0)]},
              "D = 5": {"AEVB, test": [(1e3, -190.0), (1e4, -140.0)]}}
    assert size_of(viz.save_bound_curves(panels, tmp_path / "b.png")) == (660, 370)


def test_curves_png(tmp_path):
    history = [{"epoch": 1, "train_elbo": -200.0, "test_elbo": -190.0}, {"epoch": 2, "train_elbo": -150.0}]
    assert size_of(viz.save_curves(history, tmp_path / "c.png")) == (600, 400)


# --------------------------------------------------------------- what the pictures decode


@pytest.fixture
def captured(monkeypatch):
    """Record the images a grid picture lays out instead of drawing them."""
    calls = []

    def capture(images, path, **kwargs):
        calls.append((images.clone(), kwargs))
        return Path(path)

    monkeypatch.setattr(viz, "_save_labelled_grid", capture)
    return calls


def test_interpolation_decodes_the_straight_line_between_encoder_means(pair, x, captured, tmp_path):
    model, guide = pair
    viz.save_interpolation(model, guide, x[:2], x[2:4], tmp_path / "i.png", steps=5)
    images, kwargs = captured[0]
    grid = images.reshape(2, 7, 784)
    z_a, z_b = viz.posterior_mean(guide, x[:2]), viz.posterior_mean(guide, x[2:4])
    assert torch.equal(grid[:, 0], x[:2]) and torch.equal(grid[:, -1], x[2:4])
    assert torch.allclose(grid[:, 1], model.decode(z_a), atol=1e-6)
    assert torch.allclose(grid[:, 3], model.decode(0.5 * (z_a + z_b)), atol=1e-6)
    assert torch.allclose(grid[:, 5], model.decode(z_b), atol=1e-6)
    assert kwargs["rows"] == 2 and kwargs["cols"] == 7


def test_traversal_varies_one_coordinate_per_row(pair, x, captured, tmp_path):
    model, guide = pair
    viz.save_traversals(model, guide, x, tmp_path / "t.png", dims=[2, 0], span=2.0, steps=3)
    images, kwargs = captured[0]
    base = viz.posterior_mean(guide, x[:1])[0]
    z = base.repeat(2, 3, 1)
    z[0, :, 2] = z.new_tensor([-2.0, 0.0, 2.0])
    z[1, :, 0] = z.new_tensor([-2.0, 0.0, 2.0])
    assert torch.allclose(images, model.decode(z).reshape(6, 784), atol=1e-6)
    assert kwargs["row_labels"] == ["z_3", "z_1"]


def test_default_traversal_rows_are_the_most_used_coordinates(pair, x, captured, tmp_path, monkeypatch):
    model, guide = pair
    spread = x.new_tensor([0.1, 5.0, 1.0])  # coordinate 2 (z_2) varies most over the batch
    monkeypatch.setattr(viz, "posterior_mean", lambda g, xb: torch.randn(xb.shape[0], 3, device=xb.device) * spread)
    viz.save_traversals(model, guide, x, tmp_path / "t.png", max_dims=2)
    assert captured[0][1]["row_labels"] == ["z_2", "z_3"]


def test_edits_shift_the_chosen_coordinates(pair, x, captured, tmp_path):
    model, guide = pair
    viz.save_edits(model, guide, x, tmp_path / "e.png", edits={0: 1.5, 2: -1.0}, n=3)
    images, _ = captured[0]
    z = viz.posterior_mean(guide, x[:3])
    edited = z + z.new_tensor([1.5, 0.0, -1.0])
    assert torch.equal(images[:3], x[:3])
    assert torch.allclose(images[3:6], model.decode(z), atol=1e-6)
    assert torch.allclose(images[6:], model.decode(edited), atol=1e-6)


def test_class_grid_shares_z_along_a_row(captured, tmp_path, device):
    model = CVAE(3, [16], num_classes=4).to(device)
    torch.manual_seed(0)
    viz.save_class_grid(model, tmp_path / "c.png", n_styles=2, classes=[1, 3])
    images, kwargs = captured[0]
    torch.manual_seed(0)  # the same draw as the picture's, on the model's device
    z = torch.randn(2, 1, 3, device=device)
    expected = torch.stack([model.decode(z[i].expand(2, 3), torch.tensor([1, 3], device=device)) for i in range(2)])
    assert torch.allclose(images, expected.reshape(4, 784), atol=1e-6)
    assert kwargs["col_labels"] == ["1", "3"]


def test_bad_picture_arguments_are_clear_errors(pair, x, tmp_path):
    model, guide = pair
    with pytest.raises(ValueError, match=r"dims must be .* in \[0, 2\]"):
        viz.save_traversals(model, guide, x, tmp_path / "t.png", dims=[3])
    with pytest.raises(ValueError, match="at least 2 latent dimensions"):
        viz.save_latent_scatter(make_guide("mean_field", latent_dim=1, hidden=[16]).to(x.device), x,
                                x.new_zeros(12), tmp_path / "s.png")
    with pytest.raises(ValueError, match="both be"):
        viz.save_interpolation(model, guide, x[:2], x[:3], tmp_path / "i.png")


def test_vae_mnist_writes_the_latent_pictures(tmp_path, example_args):
    # in-process, through the command the example runs (tests/test_examples.py runs the script)
    from vi_lab.commands import train as example

    cfg = example.parse_args(["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10",
                              "--threads", "1", "--no-progress", "--out", str(tmp_path), "--hidden", "32",
                              "--latent-dim", "3", *example_args])
    example.main(cfg)
    for name in ("interpolation.png", "traversals.png", "edits.png", "latent_scatter.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
