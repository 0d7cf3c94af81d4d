"""The mixture likelihood, sampling one pixel, bits/dim, scoring under every label, Bayes' rule."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import randomize_label_parameters
from model import build_model
from utils import (bits_per_dim, class_log_likelihoods, discretized_mix_logistic_log_probs,
                   discretized_mix_logistic_nll, log_posterior, sample_from_discretized_mix_logistic,
                   snap_to_levels)

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1
TINY = dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0, image_size=8,
            num_classes=3, embedding_dim=4, block_conditioning="film")


def random_params(M, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 10 * M, 1, 1, generator=g, dtype=torch.float64) * scale


def test_one_pixel_sums_to_one_over_all_colours():
    for seed, M in [(0, 1), (1, 4)]:
        params = random_params(M, seed)
        total = 0.0
        for r in LEVELS:  # x[k] holds the colour (r, g=LEVELS[h], b=LEVELS[w]) at pixel (h, w)
            x = torch.stack(torch.broadcast_tensors(r, LEVELS[:, None], LEVELS[None, :]))[None]
            log_p = discretized_mix_logistic_log_probs(x.float(), params.float().expand(1, -1, 256, 256))
            total += log_p.double().exp().sum().item()
        assert abs(total - 1.0) < 2e-3, (seed, M, total)


def test_nll_of_a_batch_equals_nll_of_each_image():
    torch.manual_seed(0)
    model = randomize_label_parameters(build_model(TINY)).eval()
    x = snap_to_levels(torch.rand(4, 3, 8, 8) * 2 - 1)
    labels = torch.tensor([0, 1, 2, 1])
    batch = discretized_mix_logistic_nll(x, model(x, labels))
    alone = torch.cat([discretized_mix_logistic_nll(x[i:i + 1], model(x[i:i + 1], labels[i:i + 1]))
                       for i in range(4)])
    assert torch.allclose(batch, alone, rtol=1e-5)


def test_class_log_likelihoods_equal_a_loop_over_labels():
    torch.manual_seed(0)
    model = randomize_label_parameters(build_model(TINY)).eval()
    x = snap_to_levels(torch.rand(3, 3, 8, 8) * 2 - 1)
    scores = class_log_likelihoods(model, x, 3)
    loop = torch.stack([-discretized_mix_logistic_nll(x, model(x, torch.full((3,), c))) for c in range(3)], 1)
    assert scores.shape == (3, 3)
    assert torch.allclose(scores, loop, rtol=1e-5)
    posterior = log_posterior(scores, torch.log(torch.tensor([0.2, 0.3, 0.5])))
    assert torch.allclose(posterior.exp().sum(1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("fill", [-1.0, 1.0, 0.0])
@pytest.mark.parametrize("log_scale", [-1e4, -7.0, 0.0, 7.0, 1e4])
def test_nll_and_gradients_finite_at_edges_and_extreme_scales(fill, log_scale):
    M = 3
    params = torch.randn(2, 10 * M, 4, 4) * 3
    params[:, M:].view(2, 3, 3, M, 4, 4)[:, 1] = log_scale
    params[:, M:].view(2, 3, 3, M, 4, 4)[:, 0, :, 0] = 50.0  # a mean far outside [-1, 1]
    params.requires_grad_(True)
    x = torch.full((2, 3, 4, 4), fill)
    nll = discretized_mix_logistic_nll(x, params)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and (nll >= 0).all()
    assert torch.isfinite(params.grad).all()


def test_nll_is_float32_under_autocast():
    params = torch.randn(2, 30, 4, 4).bfloat16()
    x = snap_to_levels(torch.rand(2, 3, 4, 4) * 2 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = discretized_mix_logistic_nll(x, params)
    assert nll.dtype == torch.float32


def logistic_level_probs(mean, log_scale):
    """P(level k) for a logistic discretized to the 256 levels, with open-ended edge bins."""
    s = np.exp(log_scale)
    edges = np.concatenate([[-np.inf], (LEVELS[:-1].numpy() + 1 / 255), [np.inf]])
    cdf = 1 / (1 + np.exp(-(edges - mean) / s))
    return np.diff(cdf)


def test_samples_follow_the_mixture_chi_square():
    M, N = 3, 200_000
    params = random_params(M, seed=3)
    params[:, M:].view(1, 3, 3, M, 1, 1)[:, 1] = -2.5  # moderately narrow components
    generator = torch.Generator().manual_seed(0)
    draws = sample_from_discretized_mix_logistic(params.expand(N, -1, -1, -1), generator)  # [N, 3, 1, 1]
    assert torch.equal(draws, snap_to_levels(draws))

    # Red is a plain mixture of logistics, independent of the other channels.
    weights = torch.softmax(params[0, :M, 0, 0], 0).numpy()
    rest = params[0, M:, 0, 0].view(3, 3, M).numpy()
    expected = sum(weights[m] * logistic_level_probs(rest[0, 0, m], rest[1, 0, m]) for m in range(M))
    levels = torch.round((draws[:, 0, 0, 0] + 1) * 127.5).long()
    observed = np.bincount(levels.numpy(), minlength=256)
    keep = expected * N >= 5  # pool the sparse tail into one bin, as chi-square needs
    f_obs = np.append(observed[keep], observed[~keep].sum())
    f_exp = np.append(expected[keep], expected[~keep].sum()) * N
    assert chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue > 1e-3

    # Green, given red, is logistic around mean + coeff * red in one component.
    one = random_params(1, seed=4)
    one[:, 1:].view(1, 3, 3, 1, 1, 1)[:, 1] = -3.0
    draws = sample_from_discretized_mix_logistic(one.expand(N, -1, -1, -1), generator)
    red = draws[:, 0, 0, 0]
    mode = red.mode().values
    green = draws[red == mode, 1, 0, 0]
    p = one[0, 1:, 0, 0].view(3, 3).numpy()
    expected = logistic_level_probs(p[0, 1] + np.tanh(p[2, 0]) * mode.item(), p[1, 1])
    observed = np.bincount(torch.round((green + 1) * 127.5).long().numpy(), minlength=256)
    keep = expected * len(green) >= 5
    f_obs = np.append(observed[keep], observed[~keep].sum())
    f_exp = np.append(expected[keep], expected[~keep].sum()) * len(green)
    assert chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue > 1e-3


def test_bits_per_dim():
    nll = torch.tensor([3 * 8 * 8 * np.log(2) * 2.5])
    assert torch.allclose(bits_per_dim(nll, (3, 8, 8)), torch.tensor([2.5], dtype=torch.float64))
