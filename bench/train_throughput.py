"""Training throughput of each speed option, in img/s, GFLOP/s and as a fraction of this machine's
matrix-multiply rate, optionally against the code of an earlier commit, all in one run.

    python bench/train_throughput.py [--configs configs/cpen455.yaml 'configs/seed.yaml:nr_filters=40,nr_resnet=1']
                                     [--variants fp32 channels_last bf16 bf16+channels_last]
                                     [--ref 8bd68d5] [--ref-variants fp32 channels_last] [--rounds 3] [--steps 5]
                                     [--batch-size N] [--device cpu] [--data-dir ../shared/data/cpen455]

A config is a YAML file, optionally followed by ':key=value,...' overrides. A variant is a '+'-joined
set of: fp32 (the default path), channels_last, bf16 (autocast; the loss stays float32), compile
(torch.compile of the model and its loss, as train.py --compile), compile_graphs (the same, replayed
as CUDA graphs: mode reduce-overhead), compile_blocks (torch.compile of each gated resnet only, a
"regional" compile that fuses their elementwise work and leaves the rest eager). `--ref REF` adds
rows for the code at git commit REF (checked out into a temporary worktree), for the variants of
`--ref-variants` (fp32 and channels_last by default), so that a speed-up is a ratio measured in the
same run.

Each (variant, round) runs in a fresh process: build the model, two warm-up steps, then `--steps`
full training steps (forward, the config's loss, backward, Adam) on one batch: random images, or
with --data-dir the first images of its train.csv, on which the hybrid objective's gradients (unlike
random images') reach float32's denormal range (see config.flush_denormals). Rounds go
variant by variant in turn (A B C A B C ...), so drift in the machine's speed spreads over all of
them; the table gives each variant's median round. GFLOP/s counts the multiply-adds of
convolutions and matrix products (torch.utils.flop_counter, 2 FLOPs each) of the step as the
reference formulation defines it (explicitly padded convolutions), so that every variant, and the
--ref code, is credited with the same work per image. The matrix-multiply rate is a 2048x2048
torch.mm in float32 and in bfloat16 (where the device has bf16 natively), measured in this run on
the same threads.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

import reference
from reference import ROOT, worktree
PROG = "train_throughput.py"
OPTIONS = ("fp32", "channels_last", "bf16", "compile", "compile_graphs", "compile_blocks")


def read_config(spec):
    """'path.yaml[:key=value,...]' -> config dict (overrides parsed as YAML values)."""
    path, _, overrides = spec.partition(":")
    with open(os.path.join(ROOT, path) if not os.path.isabs(path) else path) as f:
        config = yaml.safe_load(f)
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    return config


def matmul_rate(dtype, device, n=2048, repeats=10):
    """GFLOP/s of an n x n torch.mm in `dtype` on `device` (a CPU: this process's threads), best of three."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def matmul_rates(device):
    """{'fp32': GFLOP/s, 'bf16': GFLOP/s or None}. bf16 is timed only where the device has it
    natively: emulated, a 2048x2048 product takes seconds (about 1 GFLOP/s on an AVX2 CPU)."""
    from config import native_bf16
    return {"fp32": matmul_rate(torch.float32, device),
            "bf16": matmul_rate(torch.bfloat16, device) if native_bf16(device) else None}


def share(gflops, rate):
    return f"{gflops / rate:.0%}" if rate else "n/a"


def step_function(model, config, variant, batch_size, device, batch=None):
    """A closure running one training step of `model` on a fixed batch: `batch` (uint8 images
    [B, 3, S, S], labels [B]), else random images and labels."""
    try:
        from utils import training_loss  # from the code under test (see --code)
    except ImportError:  # code from before the loss moved to utils.py
        from train import training_loss
    size, K = config["image_size"], config["num_classes"]
    if batch is None:
        batch = (torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8),
                 torch.randint(0, max(K, 1), (batch_size,)))
    x, y = batch[0].to(device) / 127.5 - 1, batch[1].to(device)
    options = set(variant.split("+"))
    if "channels_last" in options:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if "compile_blocks" in options:
        import layers
        # Every block is a recompile of the one forward (new shapes, new self): allow one each.
        torch._dynamo.config.recompile_limit = 256
        for block in model.modules():
            if isinstance(block, layers.GatedResnet):
                block.compile()
    # compiled as train.py compiles on one process: the network and its loss as one graph
    loss_function = (torch.compile(training_loss, mode="reduce-overhead") if "compile_graphs" in options
                     else torch.compile(training_loss) if "compile" in options else training_loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    bf16 = "bf16" in options

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_function(model, x, y, K, config.get("cls_loss_weight", 0.0),
                                    config.get("cls_batch_size", 0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@contextlib.contextmanager
def explicitly_padded(model):
    """`model` with every shifted convolution written as pad-then-convolve (the reference
    formulation): this code convolves with the conv's own padding and crops, which computes a few
    percent more outputs than it keeps."""
    import layers
    import torch.nn.functional as F
    shifted = [m for m in model.modules() if isinstance(m, getattr(layers, "ShiftedConv2d", ()))]
    paddings = [m.conv.padding for m in shifted]
    for m in shifted:
        # pad is (left, right, top), or (left, right, top, bottom) in older commits that --ref times
        m.forward = lambda x, m=m: m.conv(F.pad(x, (*m.pad, 0, 0)[:4]))
        m.conv.padding = 0
    try:
        yield model
    finally:
        for m, padding in zip(shifted, paddings):
            del m.forward  # the class's own forward again
            m.conv.padding = padding


def reference_flops(model, step):
    """FLOPs of one step of `model`, explicitly padded (see explicitly_padded)."""
    from torch.utils.flop_counter import FlopCounterMode
    with explicitly_padded(model), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(config, variant, steps, batch_size, device, batch=None):
    import utils  # from the code under test (see --code)
    from model import MODEL_DEFAULTS, build_model
    try:
        import config as where
    except ImportError:  # code from before config.py
        where = utils
    # The CPU settings that train.py applies, as far as the code under test has them.
    speed_up = getattr(where, "speed_up_cpu", None) or getattr(where, "reuse_freed_memory", lambda: None)
    speed_up()
    torch.manual_seed(0)
    model = build_model({k: v for k, v in config.items() if k in MODEL_DEFAULTS}).to(device)
    # Counted first, on the eager model: compile_blocks compiles the model's own blocks in place.
    flops = reference_flops(model, step_function(model, config, "fp32", batch_size, device, batch))
    step = step_function(model, config, variant, batch_size, device, batch)
    start = time.perf_counter()
    for _ in range(2):
        step()
    warmup = time.perf_counter() - start
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / seconds, "gflop_per_image": flops / batch_size / 1e9,
            "warmup_s": warmup}


def real_batch(data_dir, config, batch_size, path):
    """Save the first `batch_size` images of <data_dir>/train.csv and their labels to `path`,
    loaded by this checkout's dataset.py, for every timed process to read."""
    import dataset
    from config import UsageError
    items, images = dataset.load_labelled_split(data_dir, "train", config["image_size"], config["num_classes"])
    if len(items) < batch_size:
        raise UsageError(f"{data_dir} has {len(items)} training images, fewer than a batch of {batch_size}")
    torch.save((images[:batch_size], torch.tensor([label for _, label in items[:batch_size]])), path)


def run_one(code, spec, variant, args, batch_file=None):
    command = [sys.executable, os.path.abspath(__file__), "--one", variant, "--code", code,
               "--configs", spec, "--steps", str(args.steps), "--device", args.device]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if batch_file:
        command += ["--batch-file", batch_file]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:100]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_config(spec):
    """UsageError unless `spec` names a config file and overrides only keys of this checkout's
    config. Only the parent process checks: a timed one imports nothing of this checkout."""
    from config import DEFAULTS, UsageError, read_yaml_config
    path, _, overrides = spec.partition(":")
    read_yaml_config(os.path.join(ROOT, path))
    for item in filter(None, overrides.split(",")):
        key = item.partition("=")[0]
        if key not in DEFAULTS:
            raise UsageError(f"{spec}: unknown config key {key!r}")


def main():
    parser = reference.parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/cpen455.yaml"])
    parser.add_argument("--variants", nargs="+", default=["fp32", "channels_last", "bf16", "bf16+channels_last"])
    parser.add_argument("--ref", default=None, help="also time the code of this git commit")
    parser.add_argument("--ref-variants", nargs="+", default=["fp32", "channels_last"],
                        help="the variants timed on the --ref code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="time on real training images from here (its train.csv)")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # internal: time one variant, print JSON
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)  # internal: the batch of --data-dir
    parser.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for variant in args.variants + args.ref_variants + ([args.one] if args.one else []):
        unknown = set(variant.split("+")) - set(OPTIONS)
        if unknown:
            parser.error(f"variant {variant!r}: unknown option {sorted(unknown)[0]!r}; options: {', '.join(OPTIONS)}")

    if args.one:
        sys.path.insert(0, args.code)
        config = read_config(args.configs[0])
        batch = torch.load(args.batch_file, weights_only=True) if args.batch_file else None
        result = measure(config, args.one, args.steps, args.batch_size or config["batch_size"],
                         torch.device(args.device), batch)
        print(json.dumps(result))
        return 0
    from config import UsageError, report
    try:
        compare(args)
    except UsageError as err:  # also DataError
        return report(PROG, err)
    return 0


def compare(args):
    """Every variant of every config, --rounds times in turn, and the tables."""
    from config import UsageError
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for spec in args.configs:
        check_config(spec)
    with contextlib.ExitStack() as stack:
        batch_files = {}  # config spec -> its batch of --data-dir, read first: a bad path fails at once
        if args.data_dir:
            scratch = stack.enter_context(tempfile.TemporaryDirectory())
            for i, spec in enumerate(args.configs):
                config = read_config(spec)
                batch_files[spec] = os.path.join(scratch, f"batch{i}.pt")
                real_batch(args.data_dir, config, args.batch_size or config["batch_size"], batch_files[spec])
        rows = [(ROOT, variant, variant) for variant in args.variants]
        if args.ref:  # checked out before any timing: a bad REF fails at once
            ref_code = stack.enter_context(worktree(args.ref))
            rows = [(ref_code, v, f"{args.ref} {v}") for v in args.ref_variants] + rows
        rates = matmul_rates(torch.device(args.device))
        bf16_rate = f"{rates['bf16']:.0f} in bfloat16" if rates["bf16"] else "bfloat16 not native here (not timed)"
        print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}; "
              f"2048x2048 torch.mm: {rates['fp32']:.0f} GFLOP/s in float32, {bf16_rate}")
        if args.data_dir:
            print(f"images: the first of {os.path.join(args.data_dir, 'train.csv')}")
        for spec in args.configs:
            config = read_config(spec)
            model_keys = ", ".join(f"{k} {config[k]}" for k in ("nr_resnet", "nr_filters", "nr_logistic_mix"))
            print(f"\n{spec} ({model_keys}), batch {args.batch_size or config['batch_size']}, "
                  f"cls_loss_weight {config.get('cls_loss_weight', 0.0)}")
            print("| code, variant | img/s | GFLOP/s | of the fp32 mm rate | of the bf16 mm rate | "
                  "vs first row | warm-up s |")
            print("|---|---|---|---|---|---|---|")
            results = {label: [] for _, _, label in rows}
            for _ in range(args.rounds):
                for code, variant, label in rows:
                    results[label].append(run_one(code, spec, variant, args, batch_files.get(spec)))
            first = gflop_per_image = None
            for _, _, label in rows:
                good = [r for r in results[label] if "error" not in r]
                if not good:
                    print(f"| {label} | failed: {results[label][0]['error']} | | | | | |")
                    continue
                speed = statistics.median(r["images_per_s"] for r in good)
                gflop_per_image = good[0]["gflop_per_image"]
                gflops = speed * gflop_per_image
                first = first or speed
                print(f"| {label} | {speed:.1f} | {gflops:.0f} | {share(gflops, rates['fp32'])} | "
                      f"{share(gflops, rates['bf16'])} | {speed / first:.2f}x | "
                      f"{statistics.median(r['warmup_s'] for r in good):.1f} |", flush=True)
            if gflop_per_image is not None:
                print(f"GFLOP per image (training step): {gflop_per_image:.2f}")


if __name__ == "__main__":
    sys.exit(main())
