"""sampling.py: the naive sampler, the cached one (exactly what the full network computes, at a
constant cost per pixel), generate() and its seeding."""
import pytest
import torch

import sampling
from conftest import randomize_label_parameters
from model import build_model
from sampling import IncrementalPixelCNN, generate_cached

MODES = [(0, 0, "none"), (3, 4, "none"), (3, 0, "bias"), (3, 4, "bias"), (3, 0, "film"), (3, 4, "film")]


def tiny_model(nr_resnet=1, num_classes=3, embedding_dim=4, conditioning="bias", size=8):
    torch.manual_seed(0)
    model = build_model(dict(nr_resnet=nr_resnet, nr_filters=8, nr_logistic_mix=2, dropout=0.0,
                             image_size=size, num_classes=num_classes, embedding_dim=embedding_dim,
                             block_conditioning=conditioning))
    return randomize_label_parameters(model).eval()


@pytest.mark.parametrize("nr_resnet", [1, 2])
@pytest.mark.parametrize("num_classes,embedding_dim,conditioning", MODES)
def test_cached_params_equal_the_full_forward_at_every_pixel(nr_resnet, num_classes, embedding_dim, conditioning):
    model = tiny_model(nr_resnet, num_classes, embedding_dim, conditioning)
    x = torch.randint(0, 256, (2, 3, 8, 8)) / 127.5 - 1
    labels = torch.tensor([0, 2]) if num_classes else None
    with torch.inference_mode():
        full = model(x, labels)
        net = IncrementalPixelCNN(model, labels, 2, x.device, x.dtype)
        for i in range(8):
            net.start_row(i)
            for j in range(8):
                cached = net.params_at(i, j)[:, :, 0, 0]
                assert (cached - full[:, :, i, j]).abs().max() < 1e-4, (i, j)
                net.set_pixel(i, j, x[:, :, i:i + 1, j:j + 1])


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 7])
def test_cache_filled_from_given_rows_equals_the_full_forward_below(rows):
    """take_rows computes, all rows at once, what the pixel-by-pixel pass would have computed over
    them (odd row counts end mid-way through the coarser grids' rows)."""
    model = tiny_model(2, 3, 4, "film")
    x = torch.randint(0, 256, (2, 3, 8, 8)) / 127.5 - 1
    labels = torch.tensor([1, 2])
    with torch.inference_mode():
        full = model(x, labels)
        net = IncrementalPixelCNN(model, labels, 2, x.device, x.dtype)
        net.take_rows(x, rows)
        for i in range(rows, 8):
            net.start_row(i)
            for j in range(8):
                assert (net.params_at(i, j)[:, :, 0, 0] - full[:, :, i, j]).abs().max() < 1e-4, (i, j)
                net.set_pixel(i, j, x[:, :, i:i + 1, j:j + 1])


def test_work_per_row_does_not_grow_with_the_row():
    model = tiny_model(1, 3, 4, "film", size=16)
    net = IncrementalPixelCNN(model, torch.tensor([1]), 1, "cpu", torch.float32)
    computed = []
    conv = net.conv

    def counting_conv(*args, **kwargs):
        out = conv(*args, **kwargs)
        computed.append(out.numel())
        return out

    net.conv = counting_conv
    per_row = []
    with torch.inference_mode():
        for i in range(16):
            computed.clear()
            net.start_row(i)
            for j in range(16):
                net.set_pixel(i, j, torch.zeros(1, 3, 1, 1))
                net.params_at(i, j)
            per_row.append(sum(computed))
    # Rows with the same phase (i mod 4) do the same work, wherever they are in the image.
    for phase in range(4):
        assert len(set(per_row[phase + 4::4])) == 1, per_row
    assert max(per_row) < 3 * min(per_row[1:])


def test_generate_cached_gives_images_on_the_256_levels():
    model = tiny_model(1, 3, 4, "bias")
    images = generate_cached(model, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 8, 8)
    levels = (images + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The naive sampler, generate() and seeding.

def test_naive_sampler_levels_and_dtypes():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 1])
    g = torch.Generator().manual_seed(3)
    x = sampling.generate_naive(model, labels, g)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    levels = (x + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the 256 levels
    images = sampling.generate(model, labels, "naive", seed=3)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert torch.equal(images, levels.round().to(torch.uint8))
    assert len(images.unique()) > 10  # not a constant image

    model64 = tiny_model().double()
    x64 = sampling.generate_naive(model64, labels, torch.Generator().manual_seed(3))
    assert x64.dtype == torch.float64
    assert sampling.generate(model64, labels, "naive", seed=3).dtype == torch.uint8


def test_same_seed_same_images_different_seed_different():
    model = tiny_model()
    labels = torch.tensor([0, 2])
    a = sampling.generate(model, labels, "naive", seed=11)
    b = sampling.generate(model, labels, "naive", seed=11)
    c = sampling.generate(model, labels, "naive", seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["fast", "naive"])
def test_a_training_model_samples_without_dropout_and_keeps_training(sampler):
    torch.manual_seed(0)
    model = build_model(dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.5, image_size=8,
                             num_classes=3, embedding_dim=0, block_conditioning="film")).train()
    labels = torch.tensor([0, 2])
    images = sampling.generate(model, labels, sampler, seed=1)
    assert model.training  # a live model keeps its dropout for the steps after sampling
    assert torch.equal(images, sampling.generate(model.eval(), labels, sampler, seed=1))
    with pytest.raises(ValueError, match="eval mode"):  # what generate's samplers see to
        sampling.sample_raster(sampling.IncrementalPixelCNN, model.train(), labels, None, None, None)


def test_unconditional_model():
    model = tiny_model(num_classes=0, embedding_dim=0, conditioning="none")
    images = sampling.generate(model, None, "naive", seed=0, n=2)
    assert images.shape == (2, 3, 8, 8)
    model.double()
    assert torch.equal(sampling.generate(model, None, "naive", seed=0, n=2),
                       sampling.generate(model, None, "fast", seed=0, n=2))


def test_fast_equals_naive_in_float64():
    model = tiny_model().double()
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(sampling.generate(model, labels, "fast", seed=5),
                       sampling.generate(model, labels, "naive", seed=5))


def test_guided_fast_equals_naive_in_float64_and_differs_from_unguided():
    model = tiny_model().double()
    labels = torch.tensor([0, 1, 2, 2])
    guided = sampling.generate(model, labels, "fast", seed=5, guidance=2.0)
    assert torch.equal(guided, sampling.generate(model, labels, "naive", seed=5, guidance=2.0))
    assert not torch.equal(guided, sampling.generate(model, labels, "fast", seed=5))
    given = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    fast = sampling.generate(model, labels, "fast", seed=5, given=given, keep_rows=3, guidance=1.0)
    assert torch.equal(fast, sampling.generate(model, labels, "naive", seed=5, given=given, keep_rows=3,
                                               guidance=1.0))
    assert torch.equal(fast[:, :, :3], given[:, :, :3])


@pytest.mark.parametrize("sampler", ["fast", "naive"])
def test_an_images_sample_does_not_depend_on_the_other_images_labels(sampler):
    """Guided, each image is scored under every label and guided to its own: the samplers share
    that code, so that agreeing with each other does not show it."""
    model = tiny_model()
    for guidance in (0.0, 2.0):
        a = sampling.generate(model, torch.tensor([0, 2]), sampler, seed=5, guidance=guidance)
        b = sampling.generate(model, torch.tensor([0, 1]), sampler, seed=5, guidance=guidance)
        assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1]), guidance


def test_the_fast_sampler_never_runs_the_full_network(monkeypatch):
    model = tiny_model()

    def full_forward(*args, **kwargs):
        raise AssertionError("the fast sampler ran a full forward pass")
    monkeypatch.setattr(model, "forward", full_forward)
    assert sampling.generate(model, torch.tensor([0, 1]), "fast", seed=0).shape == (2, 3, 8, 8)


def test_guidance_needs_labels():
    with pytest.raises(ValueError, match="guidance"):
        sampling.generate(tiny_model(num_classes=0, embedding_dim=0, conditioning="none"), None,
                          seed=0, n=2, guidance=1.0)


# ---------------------------------------------------------------------------------------------
# Completion: sampling below given rows.

def test_completion_keeps_the_given_rows_and_fast_equals_naive_in_float64():
    model = tiny_model().double()
    given = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2])
    for rows in (1, 5, 7):
        fast = sampling.generate(model, labels, "fast", seed=4, given=given, keep_rows=rows)
        naive = sampling.generate(model, labels, "naive", seed=4, given=given, keep_rows=rows)
        assert torch.equal(fast, naive), rows
        assert torch.equal(fast[:, :, :rows], given[:, :, :rows]), rows  # bit for bit
        assert not torch.equal(fast[:, :, rows:], given[:, :, rows:])


def test_completion_depends_on_the_seed_and_on_the_given_rows():
    model = tiny_model()
    given = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 2])
    a = sampling.generate(model, labels, "fast", seed=1, given=given, keep_rows=4)
    assert torch.equal(a, sampling.generate(model, labels, "fast", seed=1, given=given, keep_rows=4))
    assert not torch.equal(a, sampling.generate(model, labels, "fast", seed=2, given=given, keep_rows=4))
    # the given rows condition the rest: the same noise below other rows gives another completion
    other = given.clone()
    other[:, :, :4] = 255 - other[:, :, :4]
    b = sampling.generate(model, labels, "fast", seed=1, given=other, keep_rows=4)
    assert not torch.equal(a[:, :, 4:], b[:, :, 4:])
