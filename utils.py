"""The likelihood: the discretized mixture of logistics, bits/dim, scoring under every label,
Bayes' rule, and the training loss built from them. No I/O, and no import of the model: the
functions take any callable model(x, labels).

Mixture parameters are [B, 10*M, H, W]: channels 0..M-1 are the mixture logits; the rest view as
[B, 3 (mean, log-scale, coefficient), 3 (R, G, B), M, H, W]. The coefficients tie G's mean to R,
and B's mean to R and G. Pixel values x are in [-1, 1] on the 256 levels k / 127.5 - 1.
"""
import math

import torch
import torch.nn.functional as F

LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 7.0
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


def discretized_mix_logistic_log_probs(x, params):
    """log p(x_ij) of each pixel's RGB value, [B, H, W], in float32 (float64 for float64 input)."""
    dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
    device_type = params.device.type
    with torch.autocast(device_type, enabled=False):
        x, params = x.to(dtype), params.to(dtype)
        logits, means, log_scales, coeffs = split_mixture_params(params)
        x = x.unsqueeze(2)  # [B, 3, 1, H, W]
        centered = x - channel_means(means, coeffs, x)
        inv_scale = torch.exp(-log_scales)
        upper = inv_scale * (centered + HALF_BIN)
        lower = inv_scale * (centered - HALF_BIN)
        log_probs = torch.where(
            x < -0.999, -F.softplus(-upper),      # level 0 takes all mass below its upper edge
            torch.where(x > 0.999, -F.softplus(lower),  # level 255 takes all mass above
                        log_sigmoid_difference(upper, lower)))
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


def sample_from_discretized_mix_logistic(params, generator=None, noise=None):
    """Draw one RGB value per pixel from the mixture, snapped to the 256 levels: [B, 3, H, W].

    A component is picked with the Gumbel-max trick; each channel is a logistic draw whose mean
    uses the already sampled (and snapped) earlier channels, exactly as the likelihood conditions.
    """
    pick, draw = noise if noise is not None else mixture_noise(params, generator)
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


def class_log_likelihoods(model, x, num_classes):
    """log p(x | c) in nats for every label c, [B, K], from one forward pass over the batch
    repeated K times (label-major: rows k*B..(k+1)*B-1 carry label k)."""
    B = x.shape[0]
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(B)  # [K*B]
    params = model(x.repeat(num_classes, 1, 1, 1), labels)
    return -discretized_mix_logistic_nll(x.repeat(num_classes, 1, 1, 1), params).view(num_classes, B).T


def log_posterior(log_likelihoods, log_prior=None):
    """Bayes' rule: log p(c | x) = log p(x | c) + log p(c) - logsumexp_c(...), [B, K], in float64:
    log-likelihoods are thousands of nats, so float32 would leave posteriors off by ~1e-4."""
    joint = log_likelihoods.double()
    if log_prior is not None:
        joint = joint + torch.as_tensor(log_prior, dtype=torch.float64, device=joint.device)
    return joint - torch.logsumexp(joint, dim=1, keepdim=True)


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
    labels = torch.cat([torch.arange(num_classes, device=x.device).repeat_interleave(S), y[S:]])
    nll_all = discretized_mix_logistic_nll(scored, net(scored, labels))
    ll = -nll_all[:num_classes * S].view(num_classes, S).T  # [S, K], label-major as class_log_likelihoods
    nll = torch.cat([-ll.gather(1, y[:S, None]).squeeze(1), nll_all[num_classes * S:]])  # [B]
    ce = F.nll_loss(log_posterior(ll.float()), y[:S])
    bpd = bits_per_dim(nll.float(), x.shape[1:]).mean()
    return bpd + cls_loss_weight * ce, bpd
