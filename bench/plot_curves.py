"""Plot train and validation bits/dim (and validation accuracy) from a run's metrics.jsonl.

    python bench/plot_curves.py runs/cpen455/metrics.jsonl --out docs/cpen455_curve.png

Needs matplotlib (pip install matplotlib), which the project itself does not depend on.
"""
import argparse
import json
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_curves.py: error: needs matplotlib (pip install matplotlib)")
    with open(args.metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
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
