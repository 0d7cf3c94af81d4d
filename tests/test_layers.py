"""Building blocks: weight norm, shifted convolutions, the gated resnet."""
import torch

import pytest
import torch.nn.functional as F

import layers
from layers import (NIN, DownRightShiftedConv2d, DownRightShiftedDeconv2d, DownShiftedConv2d,
                    DownShiftedDeconv2d, GatedResnet, WNConv2d, WNConvTranspose2d, concat_elu, crop,
                    data_dependent_init, dropout, elu, gate)
from model import build_model
from utils import training_loss


def test_weight_norm_is_g_times_unit_direction():
    conv = WNConv2d(3, 5, (2, 3))
    w = conv.weight()
    assert torch.allclose(w.flatten(1).norm(dim=1), conv.g)
    conv.g.data.fill_(2.0)
    assert torch.allclose(conv.weight().flatten(1).norm(dim=1), torch.full((5,), 2.0))


def test_weight_norm_matches_the_formula_for_convs_and_deconvs():
    for layer in (WNConv2d(3, 5, (2, 3)), WNConvTranspose2d(4, 6, (2, 2)), NIN(3, 7)):
        layer.g.data.uniform_(0.5, 2.0)
        v, g, out_dim = layer.v.double(), layer.g.double(), layer.out_dim
        dims = [d for d in range(v.dim()) if d != out_dim]
        shape = [-1 if d == out_dim else 1 for d in range(v.dim())]
        expected = g.view(shape) * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        assert torch.allclose(layer.weight().double(), expected, atol=1e-6)


def test_data_dependent_init_normalises_outputs():
    torch.manual_seed(0)
    model = build_model(dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, image_size=8,
                             num_classes=2, dropout=0.0))
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    labels = torch.randint(0, 2, (16,))
    data_dependent_init(model, x, labels)
    out = model(x, labels)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(20), atol=1e-4)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(20), atol=1e-3)


def influence_of_inputs(layer, in_shape, i, j):
    x = torch.randn(in_shape, dtype=torch.float64, requires_grad=True)
    layer.double()(x)[0, :, i, j].sum().backward()
    return x.grad[0].abs().sum(0)  # [H, W]


def test_down_shifted_conv_sees_rows_up_to_its_own():
    grad = influence_of_inputs(DownShiftedConv2d(2, 3, (2, 3)), (1, 2, 6, 6), 3, 3)
    assert grad[4:].sum() == 0
    assert (grad[2:4, 2:5] > 0).all() and grad.count_nonzero() == 6


def test_down_right_shifted_conv_sees_up_and_left():
    grad = influence_of_inputs(DownRightShiftedConv2d(2, 3, (2, 2)), (1, 2, 6, 6), 3, 3)
    assert (grad[2:4, 2:4] > 0).all() and grad.count_nonzero() == 4


def test_deconvs_double_the_size_and_stay_shifted():
    x = torch.randn(1, 4, 3, 3)
    assert DownShiftedDeconv2d(4, 2)(x).shape == (1, 2, 6, 6)
    assert DownRightShiftedDeconv2d(4, 2)(x).shape == (1, 2, 6, 6)
    # output pixel (2, 3) lies in input pixel (1, 1): it sees input rows up to 1 (and, down-right
    # shifted, columns up to 1; down-shifted, the column to the right as well)
    grad = influence_of_inputs(DownRightShiftedDeconv2d(2, 2), (1, 2, 3, 3), 2, 3)
    assert grad[2:].sum() == 0 and grad[:, 2:].sum() == 0 and grad[1, 1] > 0
    grad = influence_of_inputs(DownShiftedDeconv2d(2, 2), (1, 2, 3, 3), 2, 3)
    assert grad[2:].sum() == 0 and (grad[1, 1:] > 0).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_is_a_slice_whose_gradient_keeps_the_layout(channels_last):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = crop(x, 4, 1, 4)
    assert torch.equal(out, x[:, :, :4, 1:5])
    out.backward(torch.ones_like(out))
    assert x.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = torch.zeros_like(x)
    expected[:, :, :4, 1:5] = 1
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_concat_elu_is_elu_of_x_and_minus_x_with_its_gradient(channels_last):
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 3
    x[0, 0, 0, :3] = torch.tensor([0.0, 1e-12, -1e-12])  # the kink and its neighbours
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = concat_elu(x)
    assert torch.allclose(out, F.elu(torch.cat([x, -x], dim=1)), rtol=1e-12, atol=1e-15)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.autograd.gradcheck(concat_elu, (x,))
    assert torch.autograd.gradcheck(lambda a: concat_elu(a[:, :1], a[:, 1:]), (x,))
    assert torch.equal(concat_elu(x[:, :1], x[:, 1:]), concat_elu(x))
    assert torch.allclose(elu(x), F.elu(x), rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(elu, (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_is_x_plus_a_times_sigmoid_b_with_its_gradient(channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    h = (torch.randn(2, 6, 4, 5, dtype=torch.float64) * 3).contiguous(memory_format=layout).requires_grad_(True)
    a, b = h.chunk(2, dim=1)
    out = gate(x, h)
    assert torch.allclose(out, x + a * torch.sigmoid(b), rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(gate, (x, h))
    out.backward(torch.randn_like(out))
    assert h.grad.is_contiguous(memory_format=layout)
    with torch.no_grad():
        assert torch.equal(gate(x, h), out)


@pytest.mark.parametrize("p", [0.3, 0.5])  # four 16-bit uniforms per 64-bit draw; eight 8-bit ones
def test_dropout_keeps_each_element_with_probability_1_minus_p_and_rescales(p):
    x = torch.ones(8, 16, 32, 32)
    torch.manual_seed(0)
    out = dropout(x, p, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005   # 131,072 draws: 0.0014 std at most
    assert torch.allclose(out[kept], torch.tensor(1 / (1 - p)), rtol=1e-4)  # p on a 2^-16 grid
    assert abs(out.mean().item() - 1.0) < 0.01                 # unbiased
    # Neighbours (which share one 64-bit draw) are independent, and no channel or row is favoured.
    pairs = kept.flatten()[:-1:2].float(), kept.flatten()[1::2].float()
    assert abs((pairs[0] * pairs[1]).mean().item() - (1 - p) ** 2) < 0.01
    assert kept.float().mean(dim=(0, 2, 3)).sub(1 - p).abs().max() < 0.03
    # The global generator draws the mask: a seed reproduces it; eval mode and p = 0 change nothing.
    torch.manual_seed(0)
    assert torch.equal(dropout(x, p, training=True), out)
    assert dropout(x, p, training=False) is x and dropout(x, 0.0, training=True) is x


def test_dropout_drops_exactly_p_and_not_one_level_more():
    """p = 0.5 lies on the 8-bit draws' grid: a threshold one level off would drop 1/256 more and
    bias training activations against eval by 0.8%, inside the tolerances above."""
    torch.manual_seed(0)
    kept = dropout(torch.ones(2 ** 22), 0.5, training=True) != 0
    assert abs(kept.double().mean().item() - 0.5) < 0.0015  # 4M draws: 0.00024 std


def test_dropout_follows_the_memory_layout_and_the_gradient_uses_the_same_mask():
    x = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = dropout(x, 0.5, training=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert torch.equal(x.grad != 0, out != 0)
    assert torch.allclose(x.grad[x.grad != 0], torch.tensor(2.0))


def test_under_torch_compile_the_plain_formulation_computes_the_same(monkeypatch):
    """While torch.compile traces, each hand-written op is replaced by its plain formulation:
    the same values and gradients (dropout: the same statistics, from another random stream)."""
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    h = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    ops = [lambda: crop(x, 4, 1, 4), lambda: elu(x), lambda: concat_elu(x[:, :1], x[:, 1:]), lambda: gate(x, h)]
    for requires_grad in (False, True):
        x.requires_grad_(requires_grad), h.requires_grad_(requires_grad)
        hand_written = [op() for op in ops]
        monkeypatch.setattr(layers, "compiling", lambda: True)
        plain = [op() for op in ops]
        monkeypatch.undo()
        for a, b in zip(hand_written, plain):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
            if requires_grad:
                g = torch.randn_like(a)
                grads = [torch.autograd.grad(out, (x, h), g, allow_unused=True, materialize_grads=True)
                         for out in (a, b)]
                for grad_a, grad_b in zip(*grads):
                    assert torch.allclose(grad_a, grad_b, rtol=1e-12, atol=1e-15)
    monkeypatch.setattr(layers, "compiling", lambda: True)
    kept = dropout(torch.ones(64, 64, 8, 8), 0.5, training=True) != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01


def test_the_network_and_its_loss_compile_into_one_graph():
    """torch.compile(fullgraph=True) raises at the first graph break; the eager backend traces
    without generating code, so this checks the trace in seconds."""
    torch._dynamo.reset()
    model = build_model(dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, num_classes=3, dropout=0.5,
                             embedding_dim=2, block_conditioning="film", image_size=8))
    x, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    compiled_loss = torch.compile(training_loss, fullgraph=True, backend="eager")
    loss, bpd = compiled_loss(model, x, y, 3, 0.01, 2)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        compiled = compiled_loss(model, x, y, 3, 0.01, 2)[0]
        assert torch.allclose(compiled, training_loss(model, x, y, 3, 0.01, 2)[0], rtol=1e-5)


def test_concat_elu_and_nin_shapes():
    x = torch.randn(2, 3, 4, 5)
    assert concat_elu(x).shape == (2, 6, 4, 5)
    assert NIN(3, 7)(x).shape == (2, 7, 4, 5)


def test_gated_resnet_uses_skip_and_label():
    torch.manual_seed(0)
    block = GatedResnet(4, DownShiftedConv2d, skip_channels=4, num_classes=3, conditioning="film")
    torch.nn.init.normal_(block.label_film.weight, std=0.1)  # zero at init; as if trained
    x, skip = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    out = block(x, skip, labels=torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert not torch.allclose(out, block(x, skip, labels=torch.tensor([2, 2])))
    assert not torch.allclose(out, block(x, torch.zeros_like(skip), labels=torch.tensor([0, 1])))
    # A skip given in parts is their concatenation on channels.
    two = GatedResnet(4, DownShiftedConv2d, skip_channels=6)
    a, b = torch.randn(2, 2, 6, 6), torch.randn(2, 4, 6, 6)
    assert torch.allclose(two(x, a, b), two(x, torch.cat([a, b], dim=1)), atol=1e-6)


def test_bias_and_film_conditioning_follow_their_formulas():
    """bias: h + b[y]; film: h * (1 + s[y]) + t[y], with [s | t] the label's film vector, each image
    under its own label."""
    torch.manual_seed(0)
    h, labels = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([2, 0, 1])
    bias = GatedResnet(2, DownShiftedConv2d, num_classes=3, conditioning="bias").double()
    torch.nn.init.normal_(bias.label_bias.weight)  # zero at init; as if trained
    assert torch.allclose(bias.condition(h, labels), h + bias.label_bias.weight[labels][:, :, None, None])
    film = GatedResnet(2, DownShiftedConv2d, num_classes=3, conditioning="film").double()
    torch.nn.init.normal_(film.label_film.weight)
    scale, shift = film.label_film.weight[labels][:, :, None, None].chunk(2, dim=1)
    assert torch.allclose(film.condition(h, labels), h * (1 + scale) + shift)


@pytest.mark.parametrize("conditioning", ["bias", "film"])
def test_label_conditioning_keeps_the_autocast_dtype(conditioning):
    """Under bf16 autocast the label vectors (float32 parameters) must not promote the block's
    output to float32: every later pass would then run in float32, or slower, in mixed dtypes."""
    block = GatedResnet(4, DownShiftedConv2d, num_classes=3, conditioning=conditioning)
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x, labels=torch.tensor([0, 2])).dtype == torch.bfloat16
