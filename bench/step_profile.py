"""Where one training step's time goes: wall time per ATen operator, per step, on this checkout.

    python bench/step_profile.py [--config 'configs/seed.yaml:nr_resnet=1,nr_filters=40,nr_logistic_mix=5']
                                 [--variant channels_last] [--steps 5] [--batch-size N] [--by-shape] [--rows 30]

The step is bench/train_throughput.py's (the same config specs and variants). After three warm-up
steps it times `--steps` plain steps, then as many with a dispatch mode that times every operator
call on its way to the kernel. On a CPU the kernels run synchronously, so each call's wall time is
its cost, and the calls sum to about the plain step: the table says how close, as a check.
torch.profiler adds enough of its own work per call to misplace time between small elementwise
operators, which is why this does not use it. Run it alone on the machine: anything else running
is counted into the operators it preempts.
"""
import collections
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train_throughput import OPTIONS, check_config, read_config, step_function
from reference import ROOT

sys.path.insert(0, ROOT)
from config import ArgumentParser, UsageError, report, speed_up_cpu  # noqa: E402
from model import MODEL_DEFAULTS, build_model  # noqa: E402

PROG = "step_profile.py"

CONVOLUTIONS = ("aten.convolution.default", "aten.convolution_backward.default")


class OperatorTimer(TorchDispatchMode):
    """Records the wall time of every ATen call, keyed by operator (and its first input's shape)."""

    def __init__(self, by_shape):
        super().__init__()
        self.by_shape, self.seconds = by_shape, collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        key = str(func)
        if self.by_shape:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            key += f" {list(shapes[0])}" if shapes else ""
        self.seconds[key].append(elapsed)
        return out


def seconds_per_step(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main():
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/seed.yaml:nr_resnet=1,nr_filters=40,nr_logistic_mix=5")
    parser.add_argument("--variant", default="channels_last")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--by-shape", action="store_true", help="one row per operator and input shape")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    unknown = set(args.variant.split("+")) - set(OPTIONS)
    if unknown or "compile" in args.variant:
        parser.error(f"variant {args.variant!r}: use fp32, channels_last, bf16 or their '+' joins")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        check_config(args.config)
    except UsageError as err:
        return report(PROG, err)

    speed_up_cpu()  # train.py's CPU settings
    config = read_config(args.config)
    batch_size = args.batch_size or config["batch_size"]
    torch.manual_seed(0)
    model = build_model({k: v for k, v in config.items() if k in MODEL_DEFAULTS})
    step = step_function(model, config, args.variant, batch_size, torch.device("cpu"))
    seconds_per_step(step, 3)  # warm-up
    plain = seconds_per_step(step, args.steps)
    timer = OperatorTimer(args.by_shape)
    with timer:
        timed = seconds_per_step(step, args.steps)

    per_step = {key: sum(times) / args.steps for key, times in timer.seconds.items()}
    in_operators = sum(per_step.values())
    convolutions = sum(total for key, total in per_step.items() if key.split(" ")[0] in CONVOLUTIONS)
    print(f"{args.config}, {args.variant}, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"plain step {plain * 1e3:.1f} ms ({batch_size / plain:.1f} img/s); timed step {timed * 1e3:.1f} ms, "
          f"of which {in_operators * 1e3:.1f} ms inside operators")
    print(f"convolutions (forward and backward) {convolutions * 1e3:.1f} ms, everything else "
          f"{(in_operators - convolutions) * 1e3:.1f} ms\n")
    print("| operator | calls per step | ms per step | share of operator time | median ms per call |")
    print("|---|---|---|---|---|")
    for key, total in sorted(per_step.items(), key=lambda item: -item[1])[:args.rows]:
        calls = timer.seconds[key]
        print(f"| {key.removeprefix('aten.')} | {len(calls) / args.steps:g} | {total * 1e3:.2f} | "
              f"{total / in_operators:.1%} | {statistics.median(calls) * 1e3:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
