"""The PixelCNN++ network: causality, conditioning, and config checks."""
import pytest
import torch

from conftest import randomize_label_parameters
from layers import WeightNorm
from model import MODEL_DEFAULTS, build_model, validate_model_config

MODES = [  # (num_classes, embedding_dim, block_conditioning)
    (0, 0, "none"),
    (3, 4, "none"),
    (3, 0, "bias"),
    (3, 0, "film"),
    (3, 4, "bias"),
    (3, 4, "film"),
]


def tiny_model(num_classes=3, embedding_dim=4, block_conditioning="none", **overrides):
    config = {**dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0, image_size=8,
                     num_classes=num_classes, embedding_dim=embedding_dim,
                     block_conditioning=block_conditioning), **overrides}
    torch.manual_seed(0)
    return randomize_label_parameters(build_model(config)).double().eval()


def labels_for(model, batch, value=1):
    return torch.full((batch,), value, dtype=torch.long) if model.num_classes else None


@pytest.mark.parametrize("num_classes,embedding_dim,conditioning", MODES)
def test_output_depends_only_on_earlier_pixels(num_classes, embedding_dim, conditioning):
    model = tiny_model(num_classes, embedding_dim, conditioning)
    H = W = 8
    for i, j in [(0, 0), (0, 5), (3, 0), (3, 4), (7, 7)]:
        x = torch.rand(1, 3, H, W, dtype=torch.float64, requires_grad=True)
        model(x * 2 - 1, labels_for(model, 1))[0, :, i, j].sum().backward()
        influence = x.grad[0].abs().sum(dim=0).flatten()  # [H*W], raster order
        position = i * W + j
        assert torch.all(influence[position:] == 0), f"output at {(i, j)} sees a later pixel"
        if position > 0:
            assert influence[:position].gt(0).any(), f"output at {(i, j)} sees no earlier pixel"
        if j > 0:
            assert influence[position - 1] > 0, f"output at {(i, j)} ignores the pixel to its left"


def test_channels_last_input_runs_channels_last_and_computes_the_same():
    """A channels-last input keeps every convolution channels-last (where oneDNN is fastest on some
    CPUs), with the outputs and gradients of [B, C, H, W] memory."""
    model = tiny_model(3, 4, "film")
    x, labels = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([0, 2])
    conv_inputs = []
    for module in model.modules():
        if isinstance(module, WeightNorm):
            module.register_forward_hook(lambda m, inputs, out: conv_inputs.append(inputs[0]))

    def output_and_gradients(x):
        model.zero_grad()
        out = model(x, labels)
        (out ** 2).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]
    out, grads = output_and_gradients(x)
    conv_inputs.clear()
    out_cl, grads_cl = output_and_gradients(x.contiguous(memory_format=torch.channels_last))
    assert conv_inputs and all(i.is_contiguous(memory_format=torch.channels_last) for i in conv_inputs)
    assert torch.allclose(out_cl, out, rtol=1e-12, atol=1e-12)
    for g_cl, g in zip(grads_cl, grads):
        assert torch.allclose(g_cl, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_classes,embedding_dim,conditioning", [m for m in MODES if m[0]])
def test_label_changes_output(num_classes, embedding_dim, conditioning):
    model = tiny_model(num_classes, embedding_dim, conditioning)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    out0 = model(x, torch.tensor([0, 0]))
    out2 = model(x, torch.tensor([2, 2]))
    assert out0.shape == (2, 20, 8, 8)
    assert (out0 - out2).abs().max() > 1e-6


@pytest.mark.parametrize("num_classes,embedding_dim,conditioning", [m for m in MODES if m[0]])
def test_labels_start_neutral(num_classes, embedding_dim, conditioning):
    """At init every label gives the same output, so that the hybrid loss starts at log K."""
    torch.manual_seed(0)
    model = build_model(dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0, image_size=8,
                             num_classes=num_classes, embedding_dim=embedding_dim,
                             block_conditioning=conditioning)).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(model(x, torch.tensor([0, 0])), model(x, torch.tensor([2, 2])))


@pytest.mark.parametrize("num_classes,embedding_dim,conditioning", [m for m in MODES if m[0]])
def test_each_image_is_conditioned_on_its_own_label(num_classes, embedding_dim, conditioning):
    model = tiny_model(num_classes, embedding_dim, conditioning)
    x, labels = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([0, 2, 1])
    out = model(x, labels)
    for b in range(3):
        assert torch.allclose(out[b], model(x[b:b + 1], labels[b:b + 1])[0], rtol=1e-10, atol=1e-12), b


def test_the_input_is_the_image_a_ones_channel_and_the_label_embedding():
    model = tiny_model(3, 4, "none")
    x, labels = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([0, 2])
    h = model.embed_input(x, labels)  # [2, 3 + 1 + 4, 8, 8]
    assert h.shape == (2, 8, 8, 8) and torch.equal(h[:, :3], x)
    assert torch.equal(h[:, 3], torch.ones(2, 8, 8, dtype=torch.float64))
    assert torch.equal(h[:, 4:], model.label_embedding.weight[labels][:, :, None, None].expand(-1, -1, 8, 8))


def test_the_dropout_config_reaches_the_network_in_training_only():
    model = tiny_model(dropout=0.5).train()
    x, labels = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([0, 2])
    torch.manual_seed(1)
    once = model(x, labels)
    torch.manual_seed(2)
    assert not torch.allclose(once, model(x, labels))
    model.eval()
    assert torch.equal(model(x, labels), model(x, labels))


def test_unconditional_model_needs_no_labels():
    model = tiny_model(num_classes=0, embedding_dim=0)
    assert model(torch.zeros(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 20, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.float64), torch.tensor([0]))


def test_bad_config_names_the_key_and_allowed_values():
    with pytest.raises(ValueError, match="block_conditioning.*'none', 'bias', 'film'"):
        build_model({"block_conditioning": "attention"})
    with pytest.raises(ValueError, match="unknown model config key 'nr_filter'"):
        build_model({"nr_filter": 8})
    with pytest.raises(ValueError, match="nr_resnet"):
        build_model({"nr_resnet": 0})


def test_the_model_config_is_one_table_of_keys():
    """Each key of MODEL_KEYS checks its type and range; values convert as YAML gives them."""
    assert validate_model_config({"dropout": 0, "nr_filters": 8.0}) == {**MODEL_DEFAULTS, "dropout": 0.0,
                                                                         "nr_filters": 8}
    for bad, message in [({"dropout": 1.0}, r"'dropout' must be in \[0, 1\)"),
                         ({"nr_filters": "many"}, "'nr_filters' must be an integer"),
                         ({"num_classes": True}, "'num_classes' must be an integer"),
                         ({"image_size": 6}, "'image_size' must be a multiple of 4")]:
        with pytest.raises(ValueError, match=message):
            validate_model_config(bad)


def test_bad_inputs_name_what_is_wrong():
    model = tiny_model()
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.float64), torch.tensor([3]))
    with pytest.raises(ValueError, match="labels are required"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
