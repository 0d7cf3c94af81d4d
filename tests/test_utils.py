"""The mixture likelihood, sampling one pixel, bits/dim, scoring under every label, Bayes' rule, the loss."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import randomize_label_parameters
from model import build_model
from utils import (bits_per_dim, calibration_metrics, class_log_likelihoods, class_pixel_log_likelihoods,
                   discretized_mix_logistic_log_probs, discretized_mix_logistic_nll, ece_standard_error,
                   fit_prior, fit_temperature, in_eval_mode, log_posterior, reliability,
                   sample_from_discretized_mix_logistic, sample_guided_pixel, snap_to_levels,
                   top_posterior_bins, training_loss)

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


def test_in_eval_mode_scores_without_dropout_and_restores_the_mode():
    model = build_model({**TINY, "dropout": 0.5})
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    score = in_eval_mode(lambda net: class_log_likelihoods(net, x, 3))
    for training in (True, False):
        model.train(training)
        assert torch.equal(score(model), score(model))  # no dropout draws
        assert model.training is training


def test_class_pixel_log_likelihoods_are_each_pixels_share():
    """The per-pixel terms under label c are those of a plain forward pass with label c, and they
    sum to log p(x|c): the evidence maps of classify.py --explain add up to its scores."""
    torch.manual_seed(0)
    model = randomize_label_parameters(build_model(TINY)).eval()
    x = snap_to_levels(torch.rand(3, 3, 8, 8) * 2 - 1)
    maps = class_pixel_log_likelihoods(model, x, 3)
    assert maps.shape == (3, 3, 8, 8)
    for c in range(3):
        alone = discretized_mix_logistic_log_probs(x, model(x, torch.full((3,), c)))  # [3, 8, 8]
        assert torch.allclose(maps[:, c], alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(maps.sum(dim=(2, 3)), class_log_likelihoods(model, x, 3))


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


def test_nll_of_bf16_params_under_autocast_is_the_float32_nll():
    """A bf16 network's output is scored in float32: bf16 would move log p(x) by nats per image."""
    params = torch.randn(2, 30, 4, 4).bfloat16()
    x = snap_to_levels(torch.rand(2, 3, 4, 4) * 2 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = discretized_mix_logistic_nll(x, params)
    assert nll.dtype == torch.float32
    assert torch.equal(nll, discretized_mix_logistic_nll(x, params.float()))


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


def reference_pixel_log_prob(levels, logits, means, log_scales, raw_coeffs):
    """log p(R, G, B) of one pixel, written out from the PixelCNN++ definition in float64 numpy.

    levels: three ints in 0..255; logits [M]; means, log_scales, raw_coeffs [3 (R, G, B), M].
    In component m, R ~ logistic(mu_r, s_r), G ~ logistic(mu_g + c0 r, s_g) and
    B ~ logistic(mu_b + c1 r + c2 g, s_b) with c = tanh(raw) and s = exp(clamp(log-scale, -7, 7)),
    each discretized to bins of width 2/255, the edge levels taking the open tails.
    """
    def cdf(z):  # the logistic CDF, evaluated where it does not cancel
        return 1 / (1 + np.exp(-z)) if z >= 0 else np.exp(z) / (1 + np.exp(z))

    def bin_prob(k, mean, scale):
        x = k / 127.5 - 1
        lo = -np.inf if k == 0 else (x - 1 / 255 - mean) / scale
        hi = np.inf if k == 255 else (x + 1 / 255 - mean) / scale
        return cdf(-lo) - cdf(-hi) if lo > 0 else cdf(hi) - cdf(lo)  # mirror the upper tail

    r, g, _ = (k / 127.5 - 1 for k in levels)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    scales = np.exp(np.clip(log_scales, -7.0, 7.0))
    c = np.tanh(raw_coeffs)
    total = 0.0
    for m in range(len(logits)):
        mu = [means[0, m], means[1, m] + c[0, m] * r, means[2, m] + c[1, m] * r + c[2, m] * g]
        total += weights[m] * np.prod([bin_prob(levels[ch], mu[ch], scales[ch, m]) for ch in range(3)])
    return np.log(total)


def test_log_probs_equal_the_joint_written_out_component_by_component():
    """The likelihood against the definition, channel coupling included: the sums-to-one test
    would pass for any normalised distribution, e.g. one where G ignores R."""
    M, P = 3, 16  # P pixels side by side, each with its own mixture parameters
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(P, 3))
    levels[:6] = [[0, 255, 0], [255, 0, 255], [0, 0, 0], [255, 255, 255], [1, 254, 128], [254, 1, 0]]
    logits = rng.normal(size=(P, M))
    means = rng.uniform(-1, 1, size=(P, 3, M))
    log_scales = rng.uniform(-2.0, 0.5, size=(P, 3, M))
    log_scales[0, 1, 0] = 9.0  # above the clamp at 7
    raw_coeffs = rng.normal(scale=1.5, size=(P, 3, M))

    rest = np.stack([means, log_scales, raw_coeffs], axis=1).reshape(P, 9 * M)  # [P, (3, 3, M)]
    params = torch.from_numpy(np.concatenate([logits, rest], axis=1).T)[None, :, None, :]  # [1, 10M, 1, P]
    x = torch.from_numpy(levels.T / 127.5 - 1)[None, :, None, :]  # [1, 3, 1, P]
    expected = np.array([reference_pixel_log_prob(levels[i], logits[i], means[i], log_scales[i],
                                                  raw_coeffs[i]) for i in range(P)])

    log_p = discretized_mix_logistic_log_probs(x, params)[0, 0].numpy()  # float64 in, float64 out
    np.testing.assert_allclose(log_p, expected, rtol=1e-9, atol=1e-9)
    nll = discretized_mix_logistic_nll(x, params)
    np.testing.assert_allclose(nll.numpy(), [-expected.sum()], rtol=1e-9)
    log_p32 = discretized_mix_logistic_log_probs(x.float(), params.float())[0, 0].numpy()
    np.testing.assert_allclose(log_p32, expected, rtol=1e-4, atol=1e-3)


def coupled_pixel_params():
    """One pixel's mixture [1, 10M, 1, 1] (M = 2) in float64 whose narrow components and strong
    coefficients make G track R and B track R and G: a sampler and a likelihood that disagree on
    the coupling give very different joints."""
    logits = [0.3, -0.3]
    means = [[0.1, -0.1], [-0.2, 0.1], [0.3, -0.2]]  # [R, G, B][m]
    log_scales = [[-5.0, -5.0], [-4.5, -4.5], [-5.5, -5.5]]  # a few levels per channel
    raw_coeffs = [[2.0, -2.0], [-1.5, 1.0], [1.0, 1.5]]  # tanh: |c| from 0.76 to 0.96
    params = torch.tensor([logits + sum(means + log_scales + raw_coeffs, [])], dtype=torch.float64)
    return params[:, :, None, None]


def assert_follow_the_likelihood(draws, params, min_cells):
    """Chi-square of the frequencies of sampled (R, G, B) triples [N, 3] against exp(log_probs)
    of each triple under params [1, 10M, 1, 1]."""
    N = len(draws)
    sampled = torch.round((draws + 1) * 127.5).long().numpy()  # [N, 3] levels
    # Every triple in a box of levels that holds all but a sliver of the mass; the rest is "other".
    lo, n = 89, 78  # levels 89..166, i.e. x in [-0.30, 0.30]
    box = np.stack(np.meshgrid(*[np.arange(lo, lo + n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = torch.from_numpy(box.T / 127.5 - 1)[None, :, None, :]  # [1, 3, 1, n^3]
    expected = discretized_mix_logistic_log_probs(x, params.expand(-1, -1, -1, len(box)))[0, 0].exp().numpy()
    assert expected.sum() > 0.999

    inside = ((sampled >= lo) & (sampled < lo + n)).all(1)
    code = ((sampled[inside] - lo) * [n * n, n, 1]).sum(1)
    observed = np.bincount(code, minlength=n ** 3)
    keep = expected * N >= 5  # pool the sparse cells, and everything outside the box, into one bin
    f_obs = np.append(observed[keep], N - observed[keep].sum())
    f_exp = np.append(expected[keep], 1 - expected[keep].sum()) * N
    assert keep.sum() > min_cells  # the test compares a real joint, not a handful of cells
    assert chisquare(f_obs, f_exp).pvalue > 1e-4


def test_sampled_colours_follow_the_likelihood_chi_square_on_the_joint():
    """The sampler against the likelihood, not against a reference written in the test."""
    params, N = coupled_pixel_params(), 200_000
    generator = torch.Generator().manual_seed(0)
    draws = sample_from_discretized_mix_logistic(params.expand(N, -1, -1, -1), generator)[:, :, 0, 0]
    assert_follow_the_likelihood(draws, params, min_cells=100)


# ---------------------------------------------------------------------------------------------
# Guided sampling: one pixel under every label.

def test_guided_pixel_without_guidance_follows_the_likelihood_chi_square_on_the_joint():
    """At weight 0 the level-by-level sampler draws from the label's own mixture, whatever the
    other label's: the same joint test as the logistic sampler, on the label's parameters."""
    params, N = coupled_pixel_params(), 40_000
    other = random_params(2, seed=5)
    both = torch.cat([params, other])[:, :, 0, 0]  # [K=2, 10M]: label 0 is the coupled pixel
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_guided_pixel(both.expand(N // 4, -1, -1), torch.zeros(N // 4, dtype=torch.long),
                                           0.0, generator)[0] for _ in range(4)])  # [N, 3]
    assert torch.equal(draws, snap_to_levels(draws))
    assert_follow_the_likelihood(draws, params, min_cells=50)


def test_guided_log_q_without_guidance_is_the_likelihood_of_the_drawn_pixel():
    params = random_params(3, seed=6, scale=2.0).view(1, 1, 30).expand(4, 3, 30).clone()
    params += torch.randn(4, 3, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    x, log_q = sample_guided_pixel(params, labels, 0.0, torch.Generator().manual_seed(2))
    own = params[torch.arange(4), labels][:, :, None, None]  # [B, 10M, 1, 1]
    torch.testing.assert_close(log_q, discretized_mix_logistic_log_probs(x[:, :, None, None], own)[:, 0, 0])


def test_guided_log_q_is_the_sharpened_mixture_written_out_channel_by_channel():
    """At weight w > 0, log_q of each drawn pixel against q built from the joint on a grid of
    levels that holds all but 1e-9 of every label's mass: q(r) proportional to
    p_y(r)^(1+w) / mean_k p_k(r)^w, then g given r, then b given r and g, each conditional of
    p_k summed out of log p_k(r, g, b)."""
    K, M, B, w = 2, 2, 8, 1.5
    g = torch.Generator().manual_seed(7)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    rest = torch.stack([0.03 * randn(K, 3, M), -5.0 + 0.2 * randn(K, 3, M), randn(K, 3, M)], dim=1)
    params = torch.cat([randn(K, M), rest.reshape(K, 9 * M)], dim=1)  # [K, 10M]: narrow, near 0

    lo, n = 80, 96  # levels 80..175
    levels = torch.arange(lo, lo + n, dtype=torch.float64) / 127.5 - 1
    grid = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij")).reshape(1, 3, 1, n ** 3)
    joint = torch.stack([discretized_mix_logistic_log_probs(grid, params[k].view(1, -1, 1, 1).expand(-1, -1, 1, n ** 3))
                         for k in range(K)]).view(K, n, n, n).exp()  # p_k(r, g, b)
    assert (1 - joint.sum(dim=(1, 2, 3))).abs().max() < 1e-9, 1 - joint.sum(dim=(1, 2, 3))
    p_r = joint.sum(dim=(2, 3))                                  # [K, n]
    p_g = joint.sum(dim=3) / p_r[:, :, None]                     # [K, n, n]: g given r
    p_b = joint / joint.sum(dim=3, keepdim=True)                 # [K, n, n, n]: b given r, g

    def log_q(p, y):  # sharpened over the last axis, under label y
        t = (1 + w) * p[y].log() - w * p.mean(dim=0).log()
        return t - torch.logsumexp(t, dim=-1, keepdim=True)

    labels = torch.arange(B) % K
    x, drawn_log_q = sample_guided_pixel(params.expand(B, -1, -1), labels, w, torch.Generator().manual_seed(8))
    r, gr, b = (torch.round((x + 1) * 127.5).long() - lo).T
    assert ((x >= levels[0]) & (x <= levels[-1])).all()
    expected = torch.stack([log_q(p_r, y)[r[i]] + log_q(p_g, y)[r[i], gr[i]] + log_q(p_b, y)[r[i], gr[i], b[i]]
                            for i, y in enumerate(labels.tolist())])
    torch.testing.assert_close(drawn_log_q, expected, rtol=0, atol=1e-6)


def test_guidance_raises_the_models_own_posterior_of_the_label():
    """The same uniforms at weights 0, 1 and 3: the mean log p_y(x) - log mean_k p_k(x) of the
    drawn pixels (what guidance tilts towards) grows with the weight."""
    B, K, M = 4000, 3, 2
    params = torch.randn(1, K, 10 * M, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = params.expand(B, -1, -1)
    labels = torch.arange(B) % K
    uniforms = torch.rand(B, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ratios = []
    for weight in (0.0, 1.0, 3.0):
        x, _ = sample_guided_pixel(params, labels, weight, uniforms=uniforms)
        pixel = x[:, :, None, None]
        log_p = torch.stack([discretized_mix_logistic_log_probs(pixel, params[:, k, :, None, None])
                             for k in range(K)], dim=1)[:, :, 0, 0]  # [B, K]
        own = log_p[torch.arange(B), labels]
        ratios.append((own - (torch.logsumexp(log_p, dim=1) - np.log(K))).mean().item())
    assert ratios[0] < ratios[1] < ratios[2], ratios
    assert ratios[0] > 0  # unguided draws already favour their own label, on average


def test_hybrid_loss_on_a_sub_batch_matches_scoring_every_label():
    """training_loss scores the first cls_batch_size images under every label and the rest under
    their own: its bits/dim is that of the whole batch, its cross-entropy that of the sub-batch."""
    torch.manual_seed(0)
    net = randomize_label_parameters(build_model(
        {"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2, "num_classes": 3, "embedding_dim": 0,
         "block_conditioning": "film", "image_size": 8, "dropout": 0.0})).eval()
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    y = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        ll = class_log_likelihoods(net, x, 3)  # [5, 3]
        bpd = bits_per_dim(-ll.gather(1, y[:, None]).squeeze(1), x.shape[1:]).mean()
        for cls_batch_size, scored in [(0, 5), (2, 2), (5, 5), (9, 5)]:
            loss, got_bpd = training_loss(net, x, y, 3, 0.5, cls_batch_size)
            ce = torch.nn.functional.nll_loss(log_posterior(ll[:scored]), y[:scored])
            assert torch.allclose(got_bpd, bpd, rtol=1e-5)
            assert torch.allclose(loss.double(), bpd.double() + 0.5 * ce, rtol=1e-5)
        assert torch.allclose(training_loss(net, x, y, 3, 0.0)[0], bpd, rtol=1e-5)


def test_scoring_and_the_hybrid_loss_keep_a_channels_last_batch_channels_last():
    """Repeating a batch for every label would silently give [B, C, H, W] memory, and with it the
    slower convolutions of that layout for the whole forward pass."""
    layouts = []

    def net(x, labels):  # records the layout it is given
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return torch.zeros(len(x), 10, *x.shape[2:])
    x = (torch.rand(4, 3, 8, 8) * 2 - 1).contiguous(memory_format=torch.channels_last)
    class_pixel_log_likelihoods(net, x, 3)
    training_loss(net, x, torch.tensor([0, 2, 1, 1]), 3, 0.5, 2)
    assert layouts == [True, True]


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    """Labels drawn from softmax(z / 12): the fitted T is 12 within sampling error, and the
    calibrated posteriors have a far smaller ECE, NLL and Brier score than the raw ones."""
    g = torch.Generator().manual_seed(0)
    log_likelihoods = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 30  # margins of tens of nats
    labels = torch.multinomial(torch.softmax(log_likelihoods / 12, 1), 1, generator=g).squeeze(1)
    T = fit_temperature(log_likelihoods, labels)
    assert abs(T - 12) < 0.5
    raw = calibration_metrics(log_posterior(log_likelihoods).exp(), labels)
    fitted = calibration_metrics(log_posterior(log_likelihoods, temperature=T).exp(), labels)
    assert fitted["ece"] < 0.02 < 0.2 < raw["ece"]
    assert fitted["nll"] < raw["nll"] / 3 and fitted["brier"] < raw["brier"]
    assert torch.equal(log_posterior(log_likelihoods, temperature=T).argmax(1), log_likelihoods.argmax(1))


def test_fit_prior_recovers_the_temperature_and_prior_that_made_the_labels():
    """Labels drawn from softmax(z / 12 + log p) with p = (0.1, 0.2, 0.3, 0.4): the fit finds both
    within sampling error, where T alone is pulled off 12."""
    g = torch.Generator().manual_seed(0)
    log_likelihoods = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 30
    log_prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log()
    labels = torch.multinomial(torch.softmax(log_likelihoods / 12 + log_prior, 1), 1, generator=g).squeeze(1)
    T, fitted = fit_prior(log_likelihoods, labels)
    assert abs(T - 12) < 0.5 < abs(fit_temperature(log_likelihoods, labels) - 12)
    assert torch.allclose(fitted, log_prior, atol=0.1)
    assert torch.logsumexp(fitted, 0).abs() < 1e-12  # a distribution over the labels


def test_fit_prior_on_labels_that_the_likelihoods_contradict_gives_the_flattest_posterior():
    """Every label the least likely under its image: the best 1/T is negative, which no T gives,
    so T is the upper bound (a near-uniform posterior), not the lower (near-certain and wrong)."""
    g = torch.Generator().manual_seed(2)
    log_likelihoods = torch.randn(300, 3, generator=g, dtype=torch.float64) * 10
    T, _ = fit_prior(log_likelihoods, log_likelihoods.argmin(1), bounds=(1e-2, 1e4))
    assert T == 1e4


def test_fit_prior_is_the_minimum_of_the_nll():
    """On a small biased sample: no nearby (T, prior) and not T alone gives a lower NLL, and a
    constant added to every image's log-likelihoods changes nothing."""
    g = torch.Generator().manual_seed(1)
    log_likelihoods = torch.randn(200, 3, generator=g, dtype=torch.float64) * 20
    log_likelihoods[:, 2] += 15  # label 2 runs 15 nats high on every image
    labels = torch.randint(0, 3, (200,), generator=g)
    nll = lambda T, prior: -log_posterior(log_likelihoods, prior, T).gather(1, labels[:, None]).mean().item()
    T, prior = fit_prior(log_likelihoods, labels)
    best = nll(T, prior)
    assert best < nll(fit_temperature(log_likelihoods, labels), None)
    for dT in (-0.01, 0.01):
        assert best <= nll(T * (1 + dT), prior)
    for c in range(3):
        for step in (-0.01, 0.01):
            assert best <= nll(T, prior + step * torch.eye(3, dtype=torch.float64)[c])
    shifted_T, shifted_prior = fit_prior(log_likelihoods + torch.randn(200, 1, generator=g, dtype=torch.float64) * 100, labels)
    assert shifted_T == pytest.approx(T, rel=1e-5) and torch.allclose(shifted_prior, prior, atol=1e-5)


def test_calibration_metrics_by_hand():
    """Four images, 15 bins: confidences 0.9, 0.9 (one right, one wrong) share a bin, 0.6 and 0.5
    (both right) have their own: ECE = (2 |0.5 - 0.9| + |1 - 0.6| + |1 - 0.5|) / 4 = 0.425."""
    posteriors = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0])
    metrics = calibration_metrics(posteriors, labels)
    assert metrics["ece"] == pytest.approx(0.425)
    assert metrics["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1) + np.log(0.6) + np.log(0.5)) / 4)
    assert metrics["brier"] == pytest.approx((0.02 + 1.62 + 0.32 + 0.5) / 4)
    count, confidence, accuracy = reliability(posteriors, labels)
    assert count.sum() == 4 and count[13] == 2 and confidence[13] == pytest.approx(0.9) and accuracy[13] == 0.5


def test_a_top_posterior_on_a_bin_edge_falls_in_the_bin_below():
    """Bin b of 4 holds (b/4, (b+1)/4]: 0.5 is in bin 1, 0.75 in bin 2, 1 in the last."""
    posteriors = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.75, 0], [1, 0, 0], [0.6, 0.4, 0]], dtype=torch.float64)
    index, confidence, correct = top_posterior_bins(posteriors, torch.tensor([0, 1, 1, 0]), bins=4)
    assert index.tolist() == [1, 2, 3, 2] and correct.tolist() == [1, 1, 0, 1]
    assert confidence.tolist() == [0.5, 0.75, 1.0, 0.6]


def test_ece_standard_error_is_the_bootstrap_spread():
    """Every top posterior at 1 puts all images in one bin, where ECE = 1 - accuracy: its bootstrap
    spread is then the binomial standard error sqrt(a (1 - a) / n)."""
    labels = torch.tensor([0] * 300 + [1] * 100)
    certain = torch.tensor([[1.0, 0.0]] * 400, dtype=torch.float64)  # right on 300 of 400
    spread = ece_standard_error(certain, labels)
    assert spread == pytest.approx(math.sqrt(0.75 * 0.25 / 400), rel=0.1)  # 1000 resamples: ~2%
    assert ece_standard_error(certain, labels) == spread  # a fixed seed
    all_right = torch.zeros(400, dtype=torch.long)
    assert ece_standard_error(certain, all_right) == 0  # the ECE is 0 in every resample


def test_fit_temperature_stays_in_its_bounds():
    separable = torch.tensor([[0.0, -50.0], [-50.0, 0.0]])  # every label right by 50 nats: T -> 0
    assert fit_temperature(separable, torch.tensor([0, 1])) == 1e-2
    assert fit_temperature(separable, torch.tensor([1, 0])) == 1e4  # every label wrong: T -> infinity
