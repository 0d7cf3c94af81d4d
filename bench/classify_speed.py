"""classify.py's speed and predictions against the code of an earlier commit, in one run.

    python bench/classify_speed.py --ref 8bd68d5 --checkpoint checkpoints/cpen455.pt \
        --data-dir ../shared/data/cpen455 --csv cpen455_val.csv [--rounds 3] [-- extra classify.py flags]

Runs `classify.py` of this checkout and of commit REF (checked out into a temporary worktree), each
with its own defaults, in turn (this, REF, this, REF, ...), and reports the images/s that
classify.py prints (scoring only, not start-up), the median of the rounds and their ratio. Then it
compares the two runs' log-likelihoods (--logits): the largest difference in nats, and every image
whose predicted label differs.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from reference import ROOT, worktree

sys.path.insert(0, ROOT)
from config import ArgumentParser, UsageError, report  # noqa: E402

PROG = "classify_speed.py"


def classify(code, args, extra, logits):
    command = [sys.executable, os.path.join(code, "classify.py"), "--checkpoint", args.checkpoint,
               "--data-dir", args.data_dir, "--csv", args.csv, "--out", logits + ".csv",
               "--logits", logits, "--no-progress", *extra]
    out = subprocess.run(command, capture_output=True, text=True, cwd=code)
    if out.returncode != 0:
        sys.exit(f"{code}/classify.py failed: {out.stderr.strip().splitlines()[-1]}")
    return float(re.search(r"\(([\d.]+) images/s\)", out.stdout).group(1))


def main():
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args, extra = parser.parse_known_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    extra = [a for a in extra if a != "--"]
    for name in ("checkpoint", "data_dir", "csv"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    speeds = {"this": [], args.ref: []}
    try:
        with worktree(args.ref) as ref_code, tempfile.TemporaryDirectory() as tmp:
            codes = {"this": ROOT, args.ref: ref_code}
            for _ in range(args.rounds):
                for name, code in codes.items():
                    logits = os.path.join(tmp, f"{len(speeds[name])}-{name}.npy")
                    speeds[name].append(classify(code, args, extra, logits))
            this, ref = (np.load(os.path.join(tmp, f"0-{name}.npy")) for name in codes)
    except UsageError as err:  # a --ref that git cannot check out
        return report(PROG, err)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    print(f"classify.py on {args.csv} ({len(this)} images), extra flags: {' '.join(extra) or 'none'}")
    print("| code | images/s, each round | median | vs ref |")
    print("|---|---|---|---|")
    for name, values in speeds.items():
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {median[name]:.1f} | "
              f"{median[name] / median[args.ref]:.2f}x |")
    print(differences(this, ref))


def differences(this, ref):
    """-> one line: the largest gap between two runs' log p(x|c) [N, K], and the rows whose
    predicted label differs."""
    changed = np.flatnonzero(this.argmax(1) != ref.argmax(1))
    return (f"largest |log p(x|c) difference|: {np.abs(this - ref).max():.4g} nats; "
            f"predictions that differ: {len(changed)} of {len(this)}"
            + (f" (rows {changed.tolist()})" if len(changed) else ""))


if __name__ == "__main__":
    sys.exit(main())
