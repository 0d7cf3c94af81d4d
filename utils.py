"""The likelihood: the discretized mixture of logistics, bits/dim, scoring under every label,
Bayes' rule, the training loss built from them, and the calibration of the posterior (a fitted
temperature and prior, ECE and reliability bins). No I/O, and no import of the model: the
functions take any callable model(x, labels).

Mixture parameters are [B, 10*M, H, W]: channels 0..M-1 are the mixture logits; the rest view as
[B, 3 (mean, log-scale, coefficient), 3 (R, G, B), M, H, W]. The coefficients tie G's mean to R,
and B's mean to R and G. Pixel values x are in [-1, 1] on the 256 levels k / 127.5 - 1.
"""
import functools
import math

import torch
import torch.nn.functional as F

from layers import memory_layout

LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 7.0
LEVELS = 256  # the values of an 8-bit channel, k / 127.5 - 1 on [-1, 1]
HALF_BIN = 1.0 / 255.0  # half the width of one of the 256 levels on [-1, 1]


def split_mixture_params(params):
    """[B, 10M, H, W] -> logits [B, M, H, W]; means, log_scales, coeffs, each [B, 3, M, H, W]."""
    B, C, H, W = params.shape
    if C % 10:
        raise ValueError(f"mixture parameters need 10*M channels, got {C}")
    M = C // 10
    logits = params[:, :M]
    rest = params[:, M:].reshape(B, 3, 3, M, H, W)
    log_scales = rest[:, 1].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    return logits, rest[:, 0], log_scales, torch.tanh(rest[:, 2])


def channel_means(means, coeffs, x):
    """Means of R, G, B given the pixel's earlier channels: G depends on R, B on R and G.

    means, coeffs: [B, 3, M, H, W]; x: [B, 3, 1, H, W] -> [B, 3, M, H, W].
    """
    r, g = x[:, 0], x[:, 1]
    return torch.stack([
        means[:, 0],
        means[:, 1] + coeffs[:, 0] * r,
        means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g,
    ], dim=1)


def log_sigmoid_difference(a, b):
    """log(sigmoid(a) - sigmoid(b)) for a > b, exact and stable for any a, b (even tiny a - b)."""
    return a - F.softplus(a) - F.softplus(b) + torch.log(-torch.expm1(b - a))


def level_log_probs(x, means, log_scales):
    """log P(x) of values x on the 256 levels under logistics (means, exp(log_scales)) discretized
    to those levels, elementwise with broadcasting."""
    centered = x - means
    inv_scale = torch.exp(-log_scales)
    upper = inv_scale * (centered + HALF_BIN)
    lower = inv_scale * (centered - HALF_BIN)
    return torch.where(
        x < -0.999, -F.softplus(-upper),      # level 0 takes all mass below its upper edge
        torch.where(x > 0.999, -F.softplus(lower),  # level 255 takes all mass above
                    log_sigmoid_difference(upper, lower)))


def discretized_mix_logistic_log_probs(x, params):
    """log p(x_ij) of each pixel's RGB value, [B, H, W], in float32 (float64 for float64 params)."""
    dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
    device_type = params.device.type
    with torch.autocast(device_type, enabled=False):
        x, params = x.to(dtype), params.to(dtype)
        logits, means, log_scales, coeffs = split_mixture_params(params)
        x = x.unsqueeze(2)  # [B, 3, 1, H, W]
        log_probs = level_log_probs(x, channel_means(means, coeffs, x), log_scales)  # [B, 3, M, H, W]
        log_mix = log_probs.sum(dim=1) + torch.log_softmax(logits, dim=1)  # [B, M, H, W]
        return torch.logsumexp(log_mix, dim=1)


def discretized_mix_logistic_nll(x, params):
    """Negative log-likelihood in nats per image, [B]."""
    return -discretized_mix_logistic_log_probs(x, params).sum(dim=(1, 2))


def bits_per_dim(nll, shape):
    """Nats per image -> bits per dimension, for images of shape (C, H, W)."""
    return nll / (math.prod(shape) * math.log(2))


def snap_to_levels(x):
    """Round values to the nearest of the 256 levels on [-1, 1]."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def mixture_noise(params, generator=None):
    """The random numbers one sampling step consumes, drawn in a fixed order.

    params [B, 10M, H, W] -> (uniforms for the mixture choice [B, M, H, W],
                              uniforms for the logistic draws [B, 3, H, W]).
    """
    B, C, H, W = params.shape
    eps = 1e-5
    pick = torch.rand((B, C // 10, H, W), generator=generator, device=params.device, dtype=params.dtype)
    draw = torch.rand((B, 3, H, W), generator=generator, device=params.device, dtype=params.dtype)
    return pick * (1 - 2 * eps) + eps, draw * (1 - 2 * eps) + eps


def sample_from_discretized_mix_logistic(params, generator=None):
    """Draw one RGB value per pixel from the mixture, snapped to the 256 levels: [B, 3, H, W].

    A component is picked with the Gumbel-max trick; each channel is a logistic draw whose mean
    uses the already sampled (and snapped) earlier channels, exactly as the likelihood conditions.
    """
    pick, draw = mixture_noise(params, generator)
    logits, means, log_scales, coeffs = split_mixture_params(params)
    gumbel = -torch.log(-torch.log(pick))
    choice = F.one_hot((logits + gumbel).argmax(dim=1), logits.shape[1]).movedim(-1, 1)  # [B, M, H, W]
    choice = choice.unsqueeze(1).to(params.dtype)  # [B, 1, M, H, W]
    pick_component = lambda t: (t * choice).sum(dim=2)  # [B, 3, M, H, W] -> [B, 3, H, W]
    mean, scale, coeff = pick_component(means), torch.exp(pick_component(log_scales)), pick_component(coeffs)
    logistic = torch.log(draw) - torch.log1p(-draw)
    r = snap_to_levels(mean[:, 0] + scale[:, 0] * logistic[:, 0])
    g = snap_to_levels(mean[:, 1] + coeff[:, 0] * r + scale[:, 1] * logistic[:, 1])
    b = snap_to_levels(mean[:, 2] + coeff[:, 1] * r + coeff[:, 2] * g + scale[:, 2] * logistic[:, 2])
    return torch.stack([r, g, b], dim=1)


def sample_guided_pixel(params, labels, weight, generator=None, uniforms=None):
    """Draw one RGB value per image from its label's mixture sharpened against the others: each
    channel, in the order R, G, B, from q(v) proportional to p_y(v)^(1 + weight) / mean_k p_k(v)^weight,
    where p_k(v) is the probability of level v for this channel under label k, given the channels
    already drawn (classifier-free guidance, Ho & Salimans, 2021, with the label-averaged model as
    the unconditional one). weight 0 draws from p_y exactly.

    params [B, K, 10M] (one pixel, every label), labels [B] -> (values on the 256 levels [B, 3],
    log q of those values [B], in nats: at weight 0 it is log p_y of the pixel, the likelihood's own
    term). uniforms [B, 3] in (0, 1), drawn from `generator` if not given, pick each level by its CDF.
    """
    B, K, C = params.shape
    if uniforms is None:
        uniforms = torch.rand((B, 3), generator=generator, device=params.device, dtype=params.dtype)
    one_pixel = params.reshape(B * K, C, 1, 1)
    logits, means, log_scales, coeffs = (t[..., 0, 0] for t in split_mixture_params(one_pixel))
    log_weights = torch.log_softmax(logits, dim=-1).view(B, K, -1)  # [B, K, M]: the component posterior
    means, log_scales, coeffs = (t.view(B, K, 3, -1) for t in (means, log_scales, coeffs))
    rows = torch.arange(B, device=params.device)
    levels = torch.linspace(-1, 1, LEVELS, device=params.device, dtype=params.dtype)
    x = torch.zeros(B, 3, device=params.device, dtype=params.dtype)
    log_q = torch.zeros(B, device=params.device, dtype=params.dtype)
    for ch in range(3):
        mean = channel_means(means.flatten(0, 1), coeffs.flatten(0, 1),
                             x.repeat_interleave(K, 0)[:, :, None])[:, ch].view(B, K, -1)  # [B, K, M]
        per_component = level_log_probs(levels, mean.unsqueeze(-1),
                                        log_scales[:, :, ch].unsqueeze(-1))  # [B, K, M, 256]
        per_label = torch.logsumexp(log_weights.unsqueeze(-1) + per_component, dim=2) \
            - torch.logsumexp(log_weights, dim=2, keepdim=True)  # [B, K, 256]
        own = per_label[rows, labels]  # [B, 256]
        guided = (1 + weight) * own - weight * (torch.logsumexp(per_label, dim=1) - math.log(K))
        guided = torch.log_softmax(guided, dim=-1)
        cdf = guided.exp().cumsum(dim=-1)
        level = (cdf < uniforms[:, ch:ch + 1] * cdf[:, -1:]).sum(dim=-1).clamp(max=LEVELS - 1)  # [B]
        log_q = log_q + guided[rows, level]
        x[:, ch] = level.to(params.dtype) / 127.5 - 1
        log_weights = log_weights + per_component[rows, :, :, level]  # condition on this channel
    return x, log_q


def in_eval_mode(function):
    """Decorate function(model, ...) to run with the model in eval mode (no dropout), and to leave
    it in the mode it was in: a live training model keeps its dropout after an evaluation."""
    @functools.wraps(function)
    def run(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return function(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return run


def class_pixel_log_likelihoods(model, x, num_classes):
    """log p(x_ij | x_<ij, c) in nats of each pixel (its R, G and B together) under every label c,
    [B, K, H, W], from one forward pass over the batch repeated K times (label-major: rows
    k*B..(k+1)*B-1 carry label k). Summed over H and W, it is class_log_likelihoods."""
    B = x.shape[0]
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(B)  # [K*B]
    repeated = x.repeat(num_classes, 1, 1, 1).contiguous(memory_format=memory_layout(x))  # x's layout
    log_probs = discretized_mix_logistic_log_probs(repeated, model(repeated, labels))  # [K*B, H, W]
    return log_probs.view(num_classes, B, *log_probs.shape[1:]).transpose(0, 1)


def class_log_likelihoods(model, x, num_classes):
    """log p(x | c) in nats for every label c, [B, K]: the per-pixel terms summed."""
    return class_pixel_log_likelihoods(model, x, num_classes).sum(dim=(2, 3))


def log_posterior(log_likelihoods, log_prior=None, temperature=1.0):
    """Bayes' rule: log p(c | x) = log p(x | c) / T + log p(c) - logsumexp_c(...), [B, K], in
    float64: log-likelihoods are thousands of nats, so float32 would leave posteriors off by ~1e-4.
    T = 1 is the model's own posterior; a fitted T (fit_temperature) calibrates it."""
    joint = log_likelihoods.double() / temperature
    if log_prior is not None:
        joint = joint + torch.as_tensor(log_prior, dtype=torch.float64, device=joint.device)
    return joint - torch.logsumexp(joint, dim=1, keepdim=True)


TEMPERATURE_BOUNDS = (1e-2, 1e4)  # what fit_temperature searches; the upper one: labels not predicted at all


def fit_temperature(log_likelihoods, labels, log_prior=None, bounds=TEMPERATURE_BOUNDS):
    """The T in `bounds` that minimises the mean NLL of the true labels under
    log_posterior(log_likelihoods, log_prior, T) (temperature scaling, Guo et al., 2017).

    log p(x|c) sums thousands of sub-pixel terms, so label margins run to tens of nats and the
    raw posterior is near-certain even when wrong. Dividing by T keeps every argmax (with a
    uniform prior). The NLL is convex in 1/T, so bisection on its derivative finds the minimum.
    """
    ll = torch.as_tensor(log_likelihoods, dtype=torch.float64)  # [N, K]
    y = torch.as_tensor(labels, dtype=torch.long)

    def slope(beta):  # d NLL / d beta at beta = 1/T: E_p[log p(x|c)] - log p(x|y), averaged
        p = log_posterior(ll, log_prior, 1.0 / beta).exp()
        return float(((p * ll).sum(1) - ll.gather(1, y[:, None]).squeeze(1)).mean())

    low, high = 1.0 / bounds[1], 1.0 / bounds[0]
    if slope(low) >= 0:
        return bounds[1]
    if slope(high) <= 0:
        return bounds[0]
    for _ in range(100):  # |high - low| shrinks 2^100-fold: far below float64's resolution
        middle = (low + high) / 2
        low, high = (middle, high) if slope(middle) < 0 else (low, middle)
    return 1.0 / ((low + high) / 2)


def fit_prior(log_likelihoods, labels, bounds=TEMPERATURE_BOUNDS):
    """-> (T, log p(c) [K]) that together minimise the mean NLL of the true labels under
    log_posterior(log_likelihoods, log p(c), T): temperature scaling with a fitted prior.

    On balanced classes the true prior is uniform, but a model that is still learning can be
    biased: one label's log p(x|c) may run nats high on every image. A fitted prior takes that
    off. Unlike T alone, it moves predictions. The NLL is convex in (1/T, log p(c)): a softmax
    of functions linear in them. So L-BFGS from T alone's fit finds the minimum. T is then
    clamped to `bounds`.
    """
    ll = torch.as_tensor(log_likelihoods, dtype=torch.float64)  # [N, K]
    y = torch.as_tensor(labels, dtype=torch.long)
    beta = torch.tensor(1.0 / fit_temperature(ll, y, bounds=bounds), dtype=torch.float64, requires_grad=True)
    offsets = torch.zeros(ll.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta, offsets], max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def nll():
        optimizer.zero_grad()
        loss = F.cross_entropy(ll * beta + offsets, y)
        loss.backward()
        return loss

    optimizer.step(nll)
    temperature = min(max(1.0 / beta.item(), bounds[0]), bounds[1]) if beta.item() > 0 else bounds[1]
    return temperature, torch.log_softmax(offsets.detach(), dim=0)


def top_posterior_bins(posteriors, labels, bins):
    """Per image: (the bin of its top posterior among `bins` equal-width ones [N], that top
    posterior [N], 1.0 where it is the true label [N])."""
    p = torch.as_tensor(posteriors, dtype=torch.float64)  # [N, K]
    confidence, prediction = p.max(dim=1)
    correct = (prediction == torch.as_tensor(labels, dtype=torch.long)).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # bin b holds (b/bins, (b+1)/bins]
    return index, confidence, correct


def reliability(posteriors, labels, bins=15):
    """How far the top posterior is from the accuracy: over `bins` equal-width bins of the top
    probability, -> (count [bins], mean confidence [bins], accuracy [bins]; NaN where empty)."""
    index, confidence, correct = top_posterior_bins(posteriors, labels, bins)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    mean_confidence = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence) / count
    accuracy = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct) / count
    return count, mean_confidence, accuracy


def calibration_metrics(posteriors, labels, bins=15):
    """-> {"ece": expected calibration error over `bins` equal-width bins (the count-weighted mean
    |accuracy - confidence|), "nll": mean -log p(y | x) of the true label y, "brier": mean over
    images of sum_c (p(c | x) - [c = y])^2}."""
    p = torch.as_tensor(posteriors, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    count, confidence, accuracy = reliability(p, y, bins)
    filled = count > 0
    ece = float((count[filled] * (accuracy[filled] - confidence[filled]).abs()).sum() / count.sum())
    nll = float(-p.gather(1, y[:, None]).clamp_min(1e-300).log().mean())
    brier = float(((p - torch.nn.functional.one_hot(y, p.shape[1])) ** 2).sum(1).mean())
    return {"ece": ece, "nll": nll, "brier": brier}


def ece_standard_error(posteriors, labels, bins=15, resamples=1000, seed=0):
    """The bootstrap standard error of calibration_metrics' ECE: its spread over `resamples`
    resamplings of the images with replacement (a fixed seed, so that it is reproducible). An ECE
    from a few hundred images moves by about a point between samples; this says by how much."""
    index, confidence, correct = top_posterior_bins(posteriors, labels, bins)
    in_bin = torch.nn.functional.one_hot(index, bins).double()  # [N, bins]
    n = len(confidence)
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    weights = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n, dtype=torch.float64))  # [R, N]: times each image is drawn
    gap = weights @ (in_bin * (correct - confidence)[:, None])  # [R, bins]: sum of accuracy - confidence
    return float((gap.abs().sum(dim=1) / n).std())


def training_loss(net, x, y, num_classes, cls_loss_weight, cls_batch_size=0):
    """-> (loss, mean bits/dim under the true labels). The loss is that bits/dim, plus
    cls_loss_weight x the cross-entropy of the label posterior of the first cls_batch_size images
    (0: all of them). Those images are scored under every label, the rest under their true label
    only, all in one forward pass: B + S*(K-1) images instead of K*B."""
    if cls_loss_weight == 0:
        nll = discretized_mix_logistic_nll(x, net(x, y if num_classes else None))
        bpd = bits_per_dim(nll.float(), x.shape[1:]).mean()
        return bpd, bpd
    S = min(cls_batch_size or len(x), len(x))
    scored = torch.cat([x[:S].repeat(num_classes, 1, 1, 1), x[S:]])  # [K*S + B-S, C, H, W]
    scored = scored.contiguous(memory_format=memory_layout(x))  # cat and repeat drop channels-last
    labels = torch.cat([torch.arange(num_classes, device=x.device).repeat_interleave(S), y[S:]])
    nll_all = discretized_mix_logistic_nll(scored, net(scored, labels))
    ll = -nll_all[:num_classes * S].view(num_classes, S).T  # [S, K], label-major as class_log_likelihoods
    nll = torch.cat([-ll.gather(1, y[:S, None]).squeeze(1), nll_all[num_classes * S:]])  # [B]
    ce = F.nll_loss(log_posterior(ll), y[:S])
    bpd = bits_per_dim(nll.float(), x.shape[1:]).mean()
    return bpd + cls_loss_weight * ce, bpd
