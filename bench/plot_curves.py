"""Plot train and validation bits/dim (and validation accuracy) from a run's metrics.jsonl.

    python bench/plot_curves.py runs/cpen455/metrics.jsonl --out docs/cpen455_curve.png

Give a run and its resumed continuations in order to plot them as one curve: the time axis is
the run's cumulative training time, which a resumed run carries on.

Needs matplotlib (pip install matplotlib), which the project itself does not depend on.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import atomic_write  # noqa: E402  (the repository root is on the path only now)
from config import ArgumentParser, UsageError, report  # noqa: E402

PROG = "plot_curves.py"
KEYS = ("seconds", "train_bpd", "val_bpd", "val_acc")


def main(argv=None):
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files, in training order")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        plot(read_metrics(args.metrics), args.out)
    except UsageError as err:
        return report(PROG, err)
    return 0


def read_metrics(paths):
    """The evaluations of metrics.jsonl files, one dict per line, file after file."""
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
        except OSError as err:
            raise UsageError(f"{path}: cannot read ({err.strerror})") from None
        for number, line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}, line {number}: not JSON") from None
            missing = [key for key in KEYS if key not in row]
            if missing:
                raise UsageError(f"{path}, line {number}: no {missing[0]!r} (not train.py's metrics.jsonl?)")
            rows.append(row)
    if not rows:
        raise UsageError(f"no evaluations in {', '.join(paths)}")
    return rows


def plot(rows, out):
    """Bits/dim (left axis) and accuracy (right axis) against cumulative training minutes -> PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("needs matplotlib (pip install matplotlib)") from None
    minutes = [r["seconds"] / 60 for r in rows]
    fig, bpd_axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    bpd_axis.plot(minutes, [r["train_bpd"] for r in rows], "o-", label="train bits/dim")
    bpd_axis.plot(minutes, [r["val_bpd"] for r in rows], "s-", label="val bits/dim")
    bpd_axis.set_xlabel("training time (minutes)")
    bpd_axis.set_ylabel("bits/dim")
    acc_axis = bpd_axis.twinx()
    acc_axis.plot(minutes, [100 * r["val_acc"] for r in rows], "^--", color="tab:green", label="val accuracy")
    acc_axis.set_ylabel("val accuracy (%)")
    lines = bpd_axis.get_legend_handles_labels()[0] + acc_axis.get_legend_handles_labels()[0]
    bpd_axis.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
