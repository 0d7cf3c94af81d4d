"""Training throughput (images/s) and peak memory at a config, fp32 eager against faster paths.

    python bench/train_throughput.py [--config configs/cpen455.yaml] [--steps 5] [--batch-size 32]
                                     [--variants eager channels_last compile compile+channels_last]
                                     [--device cpu]

Each variant runs in a fresh process (so that peak memory is its own) and times `--steps` full
training steps (forward over the K-fold batch, the config's loss, backward, Adam) after two warm-up
steps, on random images. Peak memory is the process's peak RSS on a CPU and
torch.cuda.max_memory_allocated on a GPU. On CUDA the eager variant uses bf16 autocast if the
config has amp: true.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import MODEL_DEFAULTS, build_model  # noqa: E402
from train import training_loss  # noqa: E402


def measure(config, variant, steps, batch_size, device):
    torch.manual_seed(0)
    model = build_model({k: v for k, v in config.items() if k in MODEL_DEFAULTS}).to(device)
    size, K = config["image_size"], config["num_classes"]
    x = torch.randint(0, 256, (batch_size, 3, size, size), device=device) / 127.5 - 1
    y = torch.randint(0, K, (batch_size,), device=device)
    if "channels_last" in variant:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if "compile" in variant else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = device.type == "cuda" and config.get("amp", False)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = training_loss(net, x, y, K, config["cls_loss_weight"], config["cls_batch_size"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(2):
        step()
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "images_per_s": steps * batch_size / seconds,
            "peak_mb": peak_mb, "warmup_s": warmup}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpen455.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="+",
                        default=["eager", "channels_last", "compile", "compile+channels_last"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    with open(args.config) as f:
        config = {**MODEL_DEFAULTS, "cls_loss_weight": 0.0, "cls_batch_size": 0, **yaml.safe_load(f)}
    if args.one:
        result = measure(config, args.one, args.steps, args.batch_size, torch.device(args.device))
        print(json.dumps(result))
        return
    print(f"{args.config}, batch {args.batch_size}, cls_loss_weight {config['cls_loss_weight']}, "
          f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| variant | images/s | vs eager | peak memory (MB) | warm-up s |")
    print("|---|---|---|---|---|")
    base = None
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                              "--batch-size", str(args.batch_size), "--device", args.device, "--one", variant],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {variant} | failed: {out.stderr.strip().splitlines()[-1][:100]} | | | |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or r["images_per_s"]
        print(f"| {variant} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
              f"{r['peak_mb']:.0f} | {r['warmup_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
