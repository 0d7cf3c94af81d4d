"""The timing benchmarks still run against the code: bench/train_throughput.py counts the work of
a reference formulation that computes what the model computes, and says in one line what is wrong
with its command line; bench/sampling.py prints a row per config and batch, and
bench/classify_speed.py finds no difference between this checkout and itself and names the rows
whose prediction differs between two runs. Tiny models, one
step; the timings themselves are not checked (benchmarks, not tests)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import layers
from checkpoint import save_checkpoint
from config import native_bf16
from conftest import randomize_label_parameters
from dataset import make_demo_dataset
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # appended: bench/sampling.py must not shadow sampling.py

import classify_speed  # noqa: E402
from train_throughput import explicitly_padded  # noqa: E402

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TINY = "nr_resnet=1,nr_filters=8,nr_logistic_mix=2,image_size=8"


def bench(script, *argv):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *argv], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_reference_formulation_computes_what_the_model_computes():
    """train_throughput.py credits a step with the FLOPs of the model with its shifted convs padded
    explicitly: the same outputs, the stride-2 convs' included, from fewer multiply-adds."""
    torch.manual_seed(0)
    model = build_model({"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2, "num_classes": 4,
                         "image_size": 8}).eval()
    assert any(m.conv.stride == 2 for m in model.modules() if isinstance(m, layers.ShiftedConv2d))
    x, labels = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randint(0, 4, (3,))
    with torch.no_grad():
        with FlopCounterMode(display=False) as own:
            expected = model(x, labels)
        with explicitly_padded(model), FlopCounterMode(display=False) as reference:
            padded = model(x, labels)
        torch.testing.assert_close(padded, expected)
        assert reference.get_total_flops() < own.get_total_flops()
        with FlopCounterMode(display=False) as after:  # and the model is itself again
            model(x, labels)
    assert after.get_total_flops() == own.get_total_flops()


def test_train_throughput_times_one_variant_in_a_process():
    last = bench("train_throughput.py", "--configs", f"configs/demo.yaml:{TINY}", "--one", "channels_last",
                 "--steps", "1", "--batch-size", "2").strip().splitlines()[-1]
    result = json.loads(last)
    assert result["images_per_s"] > 0 and result["gflop_per_image"] > 0


def test_train_throughput_says_in_one_line_what_is_wrong(tmp_path):
    cases = {
        "unknown option 'fp33'": ["--variants", "fp33"],
        "config file not found": ["--configs", str(tmp_path / "missing.yaml")],
        "unknown config key 'nr_filter'": ["--configs", "configs/demo.yaml:nr_filter=8"],
        "--rounds must be >= 1": ["--rounds", "0"],
        "--steps must be >= 1": ["--steps", "0"],
    }
    for message, argv in cases.items():
        out = subprocess.run([sys.executable, "bench/train_throughput.py", *argv], cwd=ROOT, env=ENV,
                             capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_sampling_prints_a_row_per_config_and_batch(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("".join(f"{item.replace('=', ': ')}\n" for item in TINY.split(",")) + "num_classes: 4\n")
    out = bench("sampling.py", "--configs", str(config), "--batches", "1", "2", "--naive-budget", "0.01")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| tiny.yaml")]
    assert [row[1].strip() for row in rows] == ["1", "2"]
    for row in rows:
        naive, fast = float(row[2]), float(row[3])
        assert naive > 0 and fast > 0 and row[5].strip() in ("all pixels",) + tuple(
            f"first {r} rows, x{8 / r:.3g}" for r in range(1, 9))


def test_classify_speed_finds_no_difference_between_the_checkout_and_its_head(tmp_path):
    root = make_demo_dataset(str(tmp_path / "demo"), n_per_class=2, n_val_per_class=1, n_test_per_class=1,
                             image_size=8)
    config = {"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2, "num_classes": 4, "image_size": 8}
    torch.manual_seed(0)
    weights = randomize_label_parameters(build_model(config), std=1.0).state_dict()  # labels matter
    checkpoint = str(tmp_path / "tiny.pt")
    save_checkpoint(checkpoint, {"model": weights, "ema": weights, "config": config, "epoch": 1, "step": 1})
    out = bench("classify_speed.py", "--ref", "HEAD", "--checkpoint", checkpoint, "--data-dir", root,
                "--csv", os.path.join(root, "train.csv"), "--rounds", "1")
    assert "(8 images)" in out and "| this |" in out and "| HEAD |" in out
    gap = float(re.search(r"difference\|: (\S+) nats", out).group(1))
    assert gap < 1e-3 and "predictions that differ: 0 of 8" in out


def test_classify_speed_names_the_rows_whose_prediction_differs():
    this = np.array([[-10.0, -12.0], [-9.0, -8.0], [-7.0, -7.5]])
    ref = np.array([[-10.0, -12.0], [-9.0, -9.5], [-7.25, -7.5]])
    assert classify_speed.differences(this, ref) == \
        "largest |log p(x|c) difference|: 1.5 nats; predictions that differ: 1 of 3 (rows [1])"


def test_train_throughput_times_real_images_from_a_data_dir(tmp_path):
    root = make_demo_dataset(str(tmp_path / "demo"), n_per_class=1, n_val_per_class=1, n_test_per_class=1,
                             image_size=8)
    out = bench("train_throughput.py", "--configs", f"configs/demo.yaml:{TINY}", "--variants", "fp32",
                "--rounds", "1", "--steps", "1", "--batch-size", "2", "--data-dir", root)
    assert f"images: the first of {os.path.join(root, 'train.csv')}" in out
    # bf16's matrix-multiply rate is timed only where bf16 is native: emulated, it takes minutes.
    assert ("bfloat16 not native here" in out) != native_bf16(torch.device("cpu"))
    row = next(line for line in out.splitlines() if line.startswith("| fp32 |"))
    assert float(row.split("|")[2]) > 0  # img/s


def test_train_throughput_says_when_a_data_dir_has_too_few_images_for_a_batch(tmp_path):
    root = make_demo_dataset(str(tmp_path / "demo"), n_per_class=1, n_val_per_class=1, n_test_per_class=1,
                             image_size=8)
    out = subprocess.run([sys.executable, "bench/train_throughput.py", "--configs", f"configs/demo.yaml:{TINY}",
                          "--variants", "fp32", "--rounds", "1", "--batch-size", "64", "--data-dir", root],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "fewer than a batch of 64" in out.stderr
    out = subprocess.run([sys.executable, "bench/train_throughput.py", "--variants", "fp32",
                          "--data-dir", str(tmp_path / "nowhere")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "data directory not found" in out.stderr


def test_step_profile_accounts_for_the_step_operator_by_operator():
    out = bench("step_profile.py", "--config", f"configs/demo.yaml:{TINY}", "--steps", "1", "--batch-size", "2",
                "--rows", "1000")  # all rows: their order depends on the timing
    rows = [line.strip("| ").split(" | ") for line in out.split("|---|---|---|---|---|\n")[1].splitlines()]
    operators, shares = [row[0] for row in rows], [float(row[3].rstrip("%")) for row in rows]
    assert "convolution.default" in operators and "convolution_backward.default" in operators
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5
    by_shape = bench("step_profile.py", "--config", f"configs/demo.yaml:{TINY}", "--steps", "1",
                     "--batch-size", "2", "--by-shape", "--rows", "1000")
    assert "convolution.default [2, " in by_shape and "convolutions (forward and backward) 0.0 ms" not in by_shape
