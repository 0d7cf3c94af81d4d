"""How well a temperature calibrates the posterior, measured honestly, and storing it in a checkpoint.

    python classify.py --checkpoint C --data-dir D --csv held_out.csv --out p.csv --logits ll.npy
    python bench/calibration.py --logits ll.npy --csv held_out.csv [--checkpoint C --data-dir D --save C_T.pt]
    (or, for the images that C's training run held out: --held-out val in both commands, and
    --checkpoint C --data-dir D in the second)

From the log-likelihoods that classify.py saved (--logits) and the labels of the same images, it
prints accuracy, ECE (15 bins), the NLL of the true label and the Brier score at T = 1; at the T
fitted on all the images (in-sample: optimistic); and, by 2-fold cross-fitting, at a T fitted on
one stratified half and scored on the other (each half once). Then the same for a prior fitted
together with its own T (utils.fit_prior, classify.py --prior fitted), which moves predictions:
its cross-fitted lines against T alone's say whether it helps this model. With --save it writes a
copy of the checkpoint holding both fits on all the images, as train.py stores them after each
evaluation: the upgrade for checkpoints trained before them. It first rescores the first few
images with the checkpoint (their files from --data-dir) and refuses logits that are not its own
(another checkpoint's, several experts', or --hflip's mean of two views).
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
from checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from classify import held_out_inputs, score_images  # noqa: E402
from config import ArgumentParser, UsageError, check_distinct, check_output, first_line, report  # noqa: E402
from utils import TEMPERATURE_BOUNDS, calibration_metrics, fit_prior, fit_temperature, log_posterior  # noqa: E402

PROG = "calibration.py"
RESCORED = 4  # images that --save scores again to check that --logits are the checkpoint's own


def line(name, log_likelihoods, labels, temperature, log_prior=None):
    posteriors = log_posterior(log_likelihoods, log_prior, temperature).exp()
    metrics = calibration_metrics(posteriors, labels)
    right = int((posteriors.argmax(1) == labels).sum())
    return (f"{name:<52} T {temperature:7.3f}  right {right:4d}/{len(labels)}  ECE {metrics['ece']:.4f}  "
            f"NLL {metrics['nll']:.4f}  Brier {metrics['brier']:.4f}")


def build_parser():
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--logits", required=True, help="log p(x|c) [N, K] from classify.py --logits")
    parser.add_argument("--csv", help="the id,label CSV that classify.py scored (--csv)")
    parser.add_argument("--held-out", choices=("val", "report"),
                        help="instead of --csv: the split that classify.py --held-out scored (needs "
                             "--checkpoint and --data-dir)")
    parser.add_argument("--data-dir", help="the data root, with --held-out or --save")
    parser.add_argument("--checkpoint", help="the checkpoint that made the logits")
    parser.add_argument("--save", help="write a copy of --checkpoint here, with the fitted temperature and the fitted prior")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:  # also CheckpointError
        return report(PROG, err)


def run(args):
    if args.save and not args.checkpoint:
        raise UsageError("--save writes a copy of --checkpoint; name the checkpoint too")
    if args.save:
        check_output("--save", args.save)
        check_distinct([("--save", args.save)], [("--logits", args.logits), ("--csv", args.csv)])
    if (args.csv is None) == (args.held_out is None):
        raise UsageError("give the labels of the scored images: --csv PATH or --held-out val|report")
    if args.held_out and not (args.checkpoint and args.data_dir):
        raise UsageError("--held-out needs --checkpoint and --data-dir, to recompute the run's split")
    if args.save and not args.data_dir:
        raise UsageError("--save needs --data-dir: it rescores the first images to check that --logits are "
                         "--checkpoint's own")
    state = load_checkpoint(args.checkpoint) if args.save or args.held_out else None  # fail before any figures
    log_likelihoods = read_logits(args.logits)
    labels_stored = state.get("config", {}).get("num_classes") if state is not None else None
    if labels_stored not in (None, log_likelihoods.shape[1]):
        raise UsageError(f"{args.logits} scores {log_likelihoods.shape[1]} labels, {args.checkpoint} has {labels_stored}")
    if args.held_out:
        run = {"config": state["config"], "held_out_digest": state.get("held_out_digest")}
        items, paths, _ = held_out_inputs(args.data_dir, args.held_out, [run], [args.checkpoint],
                                          log_likelihoods.shape[1])
        source = f"--held-out {args.held_out}"
    else:
        items, source = dataset.parse_split_csv(args.csv, log_likelihoods.shape[1], allow_unknown=False), args.csv
        paths = dataset.item_paths(args.data_dir, args.csv, items) if args.save else None
    if len(items) != len(log_likelihoods):
        raise UsageError(f"{source} has {len(items)} images, {args.logits} {len(log_likelihoods)}")
    if args.save:
        check_own_logits(args.checkpoint, paths[:RESCORED], log_likelihoods[:RESCORED], args.logits)
    labels = torch.tensor([label for _, label in items])
    print(line("the model's own posterior", log_likelihoods, labels, 1.0))
    fitted = fit_temperature(log_likelihoods, labels)
    print(line("T fitted on these images (in-sample)", log_likelihoods, labels, fitted))
    if args.save and fitted >= TEMPERATURE_BOUNDS[1]:
        raise UsageError(f"the fitted T is at its bound, {fitted:g}: {args.logits} does not predict the "
                         f"labels of {source} (are they the same images in the same order?); nothing saved")
    halves = cross_fitting_halves(items)
    if not halves:
        print("(too few images of each label to cross-fit: no cross-fitted lines)")
    for fit, score, name in halves:
        print(line(f"T {name}", log_likelihoods[score], labels[score], fit_temperature(log_likelihoods[fit], labels[fit])))
    prior_temperature, log_prior = fit_prior(log_likelihoods, labels)
    print(line("T and prior fitted on these images (in-sample)", log_likelihoods, labels, prior_temperature, log_prior))
    for fit, score, name in halves:
        print(line(f"T and prior {name}", log_likelihoods[score], labels[score],
                   *fit_prior(log_likelihoods[fit], labels[fit])))
    print("the fitted prior: " + ", ".join(f"{p:.4f}" for p in log_prior.exp().tolist()))
    if args.save:
        save_checkpoint(args.save, {**state, "temperature": fitted, "fitted_prior": {
            "temperature": prior_temperature, "log_prior": log_prior.tolist()}})
        print(f"wrote {args.save} with temperature {fitted:.4f}, and the prior with its own, {prior_temperature:.4f}")
    return 0


def check_own_logits(checkpoint, paths, stored, logits_path):
    """UsageError unless `checkpoint` scores the images of `paths` as the rows `stored` [n, K] say,
    to 1e-4 of their size: room for another device's float32 rounding (TF32 on a GPU), but not
    for --hflip's mean of two views (4-17 nats off on the shipped model's first 8 validation images)."""
    model, _ = load_model(checkpoint, "cpu")
    rescored = torch.from_numpy(score_images(model, paths, stored.shape[1], len(paths), "cpu", progress=False)[0])
    if not torch.allclose(rescored, stored, rtol=1e-4, atol=1e-3):
        gap = (rescored - stored).abs().max().item()
        raise UsageError(f"{logits_path} is not {checkpoint}'s log p(x|c) of its first {len(paths)} images (off by up "
                         f"to {gap:.3g} nats: another checkpoint's, several experts' or --hflip's?); nothing saved")


def cross_fitting_halves(items):
    """-> [(fit indices, score indices, name)] for the two stratified halves of `items` (seed 0);
    [] where one half would be empty (no label has two images)."""
    rows = [(row, label) for row, (_, label) in enumerate(items)]  # by row: a CSV may repeat an id
    first, second = (torch.tensor([row for row, _ in half], dtype=torch.long)
                     for half in dataset.split_train_val(rows, 0.5, seed=0))
    if len(first) == 0 or len(second) == 0:
        return []
    return [(first, second, "fitted on half A, scored on half B"),
            (second, first, "fitted on half B, scored on half A")]


def read_logits(logits_path):
    """-> log p(x|c) [N, K] as float64."""
    try:
        log_likelihoods = torch.from_numpy(np.load(logits_path)).double()
    except (OSError, ValueError) as err:
        raise UsageError(f"--logits {logits_path}: not a .npy array ({first_line(err)})") from None
    if log_likelihoods.ndim != 2:
        raise UsageError(f"--logits {logits_path}: expected [images, classes], got shape {list(log_likelihoods.shape)}")
    if not log_likelihoods.isfinite().all():
        raise UsageError(f"--logits {logits_path}: holds NaN or infinite values")
    return log_likelihoods


if __name__ == "__main__":
    sys.exit(main())
