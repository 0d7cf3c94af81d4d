"""Time a full 32x32 sample with the naive and the cached sampler, in one run, and print the ratio.

    python bench/sampling.py [--configs configs/demo.yaml configs/cpen455.yaml] [--batches 1 16 64]
                             [--naive-budget 60] [--device cpu]
    python bench/sampling.py --ref 8bd68d5 [--rounds 3] [--configs ...] [--batches ...]

With --ref, it times only the cached sampler, of this checkout and of commit REF (checked out into a
temporary worktree), in turn, in fresh processes, and prints the median of the rounds and the ratio.

Timings use random weights (the cost does not depend on them). The naive sampler runs one full
forward pass per pixel, so every pixel costs the same: where a full naive sample would take longer
than --naive-budget seconds, it is timed on its first rows only and scaled by the number of
pixels (the table says so). The fast sampler always generates whole images.
"""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import yaml

import reference
from reference import ROOT, worktree

PROG = "sampling.py"


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


def from_code_under_test(attribute, *modules):
    """`attribute` of the first of `modules` in the code under test (sys.path[0], see --code) that
    has it, or None. The layout changed (sampling.py and config.py since "one job per file",
    sample.py and utils.py before), and at an older commit `import sampling` would find this script,
    so a module counts only where the code has its file."""
    for name in modules:
        if os.path.isfile(os.path.join(sys.path[0], name + ".py")):
            value = getattr(importlib.import_module(name), attribute, None)
            if value is not None:
                return value
    return None


def time_sampler(model, labels, sampler, pixels, device):
    """Seconds to sample `pixels` pixels (all of them if None) of a batch."""
    generate = from_code_under_test("generate", "sampling", "sample")
    sync(device)
    start = time.perf_counter()
    try:
        generate(model, labels, sampler=sampler, seed=0,
                 progress=StopAfter(pixels) if pixels else None)
    except StopAfter.Reached:
        pass
    sync(device)
    return time.perf_counter() - start


def model_and_labels(path, batch, device):
    """A model of the config at `path` (random weights, seed 0) and `batch` labels cycling over its classes."""
    from model import MODEL_DEFAULTS, build_model  # from the code under test (see --code)
    with open(path) as f:
        config = {k: v for k, v in yaml.safe_load(f).items() if k in MODEL_DEFAULTS}
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    num_classes = config.get("num_classes", MODEL_DEFAULTS["num_classes"])
    labels = torch.arange(batch, device=device) % num_classes if num_classes else None
    return model, labels


def fast_against_ref(args):
    with worktree(args.ref) as ref_code:  # first: a bad REF fails before the table starts
        print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}; "
              f"cached sampler, seconds per batch, {args.rounds} rounds")
        print(f"| config | batch | this checkout | {args.ref} | {args.ref} / this |")
        print("|---|---|---|---|---|")
        for path in args.configs:
            for batch in args.batches:
                seconds = {ROOT: [], ref_code: []}
                for _ in range(args.rounds):
                    for code in seconds:
                        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--code", code,
                                              "--one", os.path.abspath(path), str(batch), "--device", args.device],
                                             capture_output=True, text=True, check=True)
                        seconds[code].append(json.loads(out.stdout.strip().splitlines()[-1]))
                this, ref = (statistics.median(v) for v in seconds.values())
                print(f"| {os.path.basename(path)} | {batch} | {this:.2f} | {ref:.2f} | {ref / this:.2f}x |",
                      flush=True)


def main():
    parser = reference.parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/demo.yaml", "configs/cpen455.yaml"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--naive-budget", type=float, default=60.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ref", default=None, help="time the cached sampler against this git commit's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)  # the code to time
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: config, batch -> seconds
    args = parser.parse_args()
    for path in args.configs if not args.one else []:  # a timed process gets a checked --one path
        if not os.path.isfile(path):
            parser.error(f"config file not found: {path}")
    sys.path.insert(0, args.code)
    device = torch.device(args.device)
    if args.one:
        # as sample.py does, where the code has it
        (from_code_under_test("speed_up_cpu", "config") or from_code_under_test("reuse_freed_memory", "config", "utils")
         or (lambda: None))()
        model, labels = model_and_labels(args.one[0], int(args.one[1]), device)
        print(json.dumps(time_sampler(model, labels, "fast", None, device)))
        return
    if args.ref:
        from config import UsageError, report
        try:
            fast_against_ref(args)
        except UsageError as err:  # a REF that git cannot check out
            return report(PROG, err)
        return
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print("| config | batch | naive s/image-batch | fast s/image-batch | naive/fast | naive timed on |")
    print("|---|---|---|---|---|---|")
    for path in args.configs:
        for batch in args.batches:
            model, labels = model_and_labels(path, batch, device)
            size = model.config["image_size"]
            pixels = size * size
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
    sys.exit(main())
