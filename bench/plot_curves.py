"""Plot train and validation bits/dim (and validation accuracy) from a run's metrics.jsonl.

    python bench/plot_curves.py runs/cpen455/metrics.jsonl --out docs/cpen455_curve.png

Give a run and its resumed continuations in order to plot them as one curve: the time axis is
the run's cumulative training time, which a resumed run carries on.

Needs matplotlib (pip install matplotlib), which the project itself does not depend on.
"""
import argparse
import json
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files, in training order")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_curves.py: error: needs matplotlib (pip install matplotlib)")
    rows = []
    for path in args.metrics:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
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
    fig.savefig(args.out)


if __name__ == "__main__":
    main()
