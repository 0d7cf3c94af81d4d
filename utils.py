"""The discretized mixture of logistics, scoring under every label, checkpoints and seeding.

Mixture parameters are [B, 10*M, H, W]: channels 0..M-1 are the mixture logits; the rest view as
[B, 3 (mean, log-scale, coefficient), 3 (R, G, B), M, H, W]. The coefficients tie G's mean to R,
and B's mean to R and G. Pixel values x are in [-1, 1] on the 256 levels k / 127.5 - 1.
"""
import ctypes
import ctypes.util
import math
import os
import random
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from model import MODEL_DEFAULTS, build_model

LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 7.0
HALF_BIN = 1.0 / 255.0  # half the width of one of the 256 levels on [-1, 1]


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable, or not one of ours."""


class UsageError(Exception):
    """A user's mistake on the command line (not about a data file or a checkpoint); one line."""


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


def save_checkpoint(path, state):
    """Write `state` (a dict of tensors and primitives) atomically: a temp file, then os.replace.

    A crash or kill at any moment leaves either the old file or the new one, never a torn one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a checkpoint need not be
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True (it cannot run code) and check that it is ours."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for foreign or corrupt files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a loadable checkpoint of plain tensors and "
                              f"primitives ({first_line})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' and 'config' entries)")
    return state


def model_from_checkpoint(state, weights="ema"):
    """Rebuild the model stored in a checkpoint dict; `weights` is 'ema' (if present) or 'model'."""
    model = build_model({k: v for k, v in state["config"].items() if k in MODEL_DEFAULTS})
    key = "ema" if weights == "ema" and state.get("ema") is not None else "model"
    model.load_state_dict(state[key])
    return model.eval()


def load_model(checkpoint, device):
    """The EMA model of a train.py checkpoint, on `device`, in eval mode; CheckpointError otherwise."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    try:
        model = model_from_checkpoint(state, weights="ema")
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{checkpoint}: the weights do not fit the model its config "
                              f"describes ({reason})") from None
    return model.to(device).eval()


def resolve_device(name):
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N' -> torch.device; UsageError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None


def native_bf16(device):
    """Whether `device` computes in bf16 natively: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX. (oneDNN emulates bf16 on other AVX-512 CPUs, more slowly than float32.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def reuse_freed_memory():
    """Let glibc's malloc keep freed memory for the next batch instead of returning it to the OS.

    By default glibc maps every block over 32 MB afresh and unmaps it when freed (and trims the
    top of its heap), so each batch page-faults its activations back in: about a quarter of
    classify.py's time on a CPU (BENCHMARKS.md). The process's memory stays at its peak instead.
    -> whether it applied (only on glibc; elsewhere it changes nothing). PyTorch's CPU tuning
    guide gets the same effect by preloading jemalloc or tcmalloc.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
