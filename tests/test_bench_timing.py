"""The timing benchmarks still run against the code: bench/train_throughput.py credits every
variant with the same work per image, bench/sampling.py prints a row per config and batch, and
bench/classify_speed.py finds no difference between this checkout and itself. Tiny models, one
step; the timings themselves are not checked (benchmarks, not tests)."""
import json
import os
import subprocess
import sys

import torch

from checkpoint import save_checkpoint
from config import native_bf16
from dataset import make_demo_dataset
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TINY = "nr_resnet=1,nr_filters=8,nr_logistic_mix=2,image_size=8"


def bench(script, *argv):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *argv], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_train_throughput_counts_the_same_work_for_every_variant():
    results = {}
    for variant in ("fp32", "channels_last"):
        last = bench("train_throughput.py", "--configs", f"configs/demo.yaml:{TINY}", "--one", variant,
                     "--steps", "1", "--batch-size", "2").strip().splitlines()[-1]
        results[variant] = json.loads(last)
    assert all(r["images_per_s"] > 0 for r in results.values())
    assert results["fp32"]["gflop_per_image"] > 0
    assert results["fp32"]["gflop_per_image"] == results["channels_last"]["gflop_per_image"]


def test_train_throughput_rejects_an_unknown_variant():
    out = subprocess.run([sys.executable, "bench/train_throughput.py", "--variants", "fp33"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown option 'fp33'" in out.stderr


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
    weights = build_model(config).state_dict()
    checkpoint = str(tmp_path / "tiny.pt")
    save_checkpoint(checkpoint, {"model": weights, "ema": weights, "config": config, "epoch": 1, "step": 1})
    out = bench("classify_speed.py", "--ref", "HEAD", "--checkpoint", checkpoint, "--data-dir", root,
                "--csv", os.path.join(root, "train.csv"), "--rounds", "1")
    assert "(8 images)" in out and "| this |" in out and "| HEAD |" in out
    assert "predictions that differ: 0 of 8" in out


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
    assert out.returncode == 1 and "fewer than a batch of 64" in out.stderr.strip().splitlines()[-1]
    out = subprocess.run([sys.executable, "bench/train_throughput.py", "--variants", "fp32",
                          "--data-dir", str(tmp_path / "nowhere")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 1 and "data directory not found" in out.stderr.strip().splitlines()[-1]


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
