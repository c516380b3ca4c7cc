"""Networks take any leading batch dimensions (the evaluators push (K, B, D) through them)."""

import pytest
import torch

from vi_lab.nets import MLP, make_decoder, make_encoder


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_encoder_and_decoder_broadcast_leading_dims(arch, device, monkeypatch):
    # cuDNN convolutions default to TF32 (about 3 decimal digits), and may pick another algorithm
    # for another batch size: full float32 keeps this a test of the batching, not of TF32 rounding
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    enc = make_encoder(arch, 784, [32]).to(device)
    dec = make_decoder(arch, 4, [32]).to(device)
    x = torch.rand(3, 5, 784, device=device)
    assert enc(x).shape == (3, 5, enc.out_dim)
    z = torch.randn(2, 3, 5, 4, device=device)
    out = dec(z)
    assert out.shape == (2, 3, 5, 784)
    # the same latent gives the same output whatever batch it sits in
    assert torch.allclose(out[1, 2, 4], dec(z[1, 2, 4][None])[0], atol=1e-5)


def test_mlp_layers_follow_the_sizes():
    net = MLP(10, [7, 5], 3)
    linears = [m for m in net.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 7), (7, 5), (5, 3)]
    assert not isinstance(net.net[-1], torch.nn.ReLU)  # outputs are unconstrained logits


@pytest.mark.parametrize("call, message", [
    (lambda: make_encoder("rnn", 784, [32]), "unknown architecture 'rnn'; valid"),
    (lambda: make_decoder("mlp", 4, [0]), "positive integers"),
    (lambda: MLP(4, [8], 2, activation="swish"), "unknown activation 'swish'"),
])
def test_bad_arguments_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
