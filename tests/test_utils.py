"""The mixture likelihood, sampling, scoring under every label, and checkpoints."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import randomize_label_parameters
from model import build_model
from utils import (CheckpointError, bits_per_dim, class_log_likelihoods,
                   discretized_mix_logistic_log_probs, discretized_mix_logistic_nll, load_checkpoint,
                   log_posterior, model_from_checkpoint, sample_from_discretized_mix_logistic,
                   save_checkpoint, snap_to_levels)

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


def test_checkpoint_round_trips_bit_for_bit_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = randomize_label_parameters(build_model(TINY)).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x, torch.tensor([0, 2])).detach(), tmp_path / "expected.pt")
    save_checkpoint(tmp_path / "model.pt", {"model": model.state_dict(), "ema": None,
                                            "config": TINY, "epoch": 1, "step": 10})
    script = (
        "import sys, torch; sys.path.insert(0, '.'); torch.set_num_threads(1);"  # as this process
        "from utils import load_checkpoint, model_from_checkpoint;"
        f"d = '{tmp_path}';"
        "m = model_from_checkpoint(load_checkpoint(d + '/model.pt'));"
        "torch.save(m(torch.load(d + '/x.pt'), torch.tensor([0, 2])).detach(), d + '/got.pt')"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "got.pt"), torch.load(tmp_path / "expected.pt"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": TINY, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")
    for name, content in [("junk.pt", b"not a checkpoint at all"), ("hello.pt", b"hello"), ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)


def test_model_from_checkpoint_prefers_ema(tmp_path):
    torch.manual_seed(0)
    model, ema = build_model(TINY), build_model(TINY)
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "ema": ema.state_dict(), "config": TINY})
    state = load_checkpoint(tmp_path / "c.pt")
    x, y = torch.zeros(1, 3, 8, 8), torch.tensor([1])
    assert torch.equal(model_from_checkpoint(state)(x, y), ema.eval()(x, y))
    assert torch.equal(model_from_checkpoint(state, weights="model")(x, y), model.eval()(x, y))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    """After reuse_freed_memory (the CLIs call it at start), a freed 64 MB block, which glibc
    would unmap on free and map afresh, is reused without page-faulting it in again."""
    script = (
        "import ctypes, resource, sys; sys.path.insert(0, '.'); import utils\n"
        "applied = utils.reuse_freed_memory() if sys.argv[1] == 'on' else False\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def use(n=64 << 20):\n"
        "    block = libc.malloc(n); ctypes.memset(block, 1, n); libc.free(block)\n"
        "use()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    use()\n"
        "print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() >> 20)"
    )
    faulted = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        applied, faulted[mode] = out.stdout.split()[0] == "True", int(out.stdout.split()[1])
    assert applied and faulted["off"] >= 256 and faulted["on"] < 4, faulted  # MB faulted in
