"""Time a full 32x32 sample with the naive and the cached sampler, in one run, and print the ratio.

    python bench/sampling.py [--configs configs/demo.yaml configs/cpen455.yaml] [--batches 1 16 64]
                             [--naive-budget 60] [--device cpu]

Timings use random weights (the cost does not depend on them). The naive sampler runs one full
forward pass per pixel, so every pixel costs the same: where a full naive sample would take longer
than --naive-budget seconds, it is timed on its first rows only and scaled by the number of
pixels (the table says so). The fast sampler always generates whole images.
"""
import argparse
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import MODEL_DEFAULTS, build_model  # noqa: E402
from sample import generate  # noqa: E402


class StopAfter:
    """A progress hook that ends sampling after `limit` pixels, so that a run can be timed on its start."""

    class Reached(Exception):
        pass

    def __init__(self, limit):
        self.limit, self.count = limit, 0

    def update(self, n=1):
        self.count += n
        if self.count >= self.limit:
            raise StopAfter.Reached


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sampler(model, labels, sampler, pixels, device):
    """Seconds to sample `pixels` pixels (all of them if None) of a batch."""
    sync(device)
    start = time.perf_counter()
    try:
        generate(model, labels, sampler=sampler, seed=0,
                 progress=StopAfter(pixels) if pixels else None)
    except StopAfter.Reached:
        pass
    sync(device)
    return time.perf_counter() - start


def model_config(path):
    with open(path) as f:
        config = yaml.safe_load(f)
    return {k: v for k, v in config.items() if k in MODEL_DEFAULTS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/demo.yaml", "configs/cpen455.yaml"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--naive-budget", type=float, default=60.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print("| config | batch | naive s/image-batch | fast s/image-batch | naive/fast | naive timed on |")
    print("|---|---|---|---|---|---|")
    for path in args.configs:
        torch.manual_seed(0)
        config = model_config(path)
        model = build_model(config).to(device).eval()
        size = config.get("image_size", MODEL_DEFAULTS["image_size"])
        pixels = size * size
        for batch in args.batches:
            labels = (torch.arange(batch, device=device) % config["num_classes"]
                      if config.get("num_classes", MODEL_DEFAULTS["num_classes"]) else None)
            fast = time_sampler(model, labels, "fast", None, device)
            one_row = time_sampler(model, labels, "naive", size, device)
            if one_row * size <= args.naive_budget:
                naive, timed_on = time_sampler(model, labels, "naive", None, device), "all pixels"
            else:
                rows = max(1, min(size, int(args.naive_budget / one_row)))
                naive = time_sampler(model, labels, "naive", rows * size, device) * pixels / (rows * size)
                timed_on = f"first {rows} rows, x{size / rows:.3g}"
            print(f"| {os.path.basename(path)} | {batch} | {naive:.1f} | {fast:.2f} | {naive / fast:.1f}x | {timed_on} |",
                  flush=True)


if __name__ == "__main__":
    main()
