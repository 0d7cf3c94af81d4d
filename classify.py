"""Zero-shot classification with a conditional PixelCNN++: Bayes' rule over the class likelihoods.

    python classify.py --checkpoint C [C2 ...] --data-dir D [--split test | --csv PATH | --held-out val|report]
                       --out predictions.csv
                       [--batch-size N] [--device auto|cpu|cuda] [--prior uniform|train|fitted] [--hflip]
                       [--temperature T] [--logits out.npy] [--metrics-out metrics.json]
                       [--explain DIR] [--explain-out maps.npz] [--explain-limit N]
    torchrun --nproc_per_node=N classify.py ...   (each process scores a shard; rank 0 writes)

D is a CPEN455-layout root (the files and labels come from D/<split>.csv, or from --csv PATH) or a
plain folder of images (every image under it, recursively, in sorted order). --held-out val (or
report) takes the images that the checkpoint's training run held out of training, recomputed from
D's training CSV with the seeds and fractions stored in the checkpoint (dataset.split_items). Every image is scored
under every label, log p(x|c) in nats, in one batched pass (EMA weights, inference mode, images
resized to the model's image_size); the prediction is argmax_c log p(x|c) + log p(c). With
--hflip each image is also scored mirrored left-right, and the prediction, the CSV's log-likelihoods
and --logits use the mean of the two log p(x|c) (bits/dim stays that of the image as given).
With several checkpoints (a product of experts, still a generative classifier) every log p(x|c),
and every per-pixel term, is the mean over the models.

The posterior columns are softmax_c(log p(x|c) / T + log p(c)), with the temperature T that
train.py fitted on its validation split and stored in the checkpoint (--temperature overrides it;
--temperature 1 gives the model's own, near-certain posterior). The log-likelihoods stay raw.
--prior fitted takes log p(c) and T that train.py fitted together on the same split (utils.fit_prior):
a model that is still learning can favour one label on every image, and a fitted prior takes that off,
so it moves predictions (BENCHMARKS.md: a gain for 45-minute runs, none for the shipped model).

The CSV (written atomically) has the header
    id,label,loglik_Class0,...,loglik_Class{K-1},posterior_Class0,...,posterior_Class{K-1}
and one row per input image, in input order: id exactly as the CSV (or folder) lists it, label the
predicted class. Where every input has a known label (not -1), it prints and saves (--metrics-out)
accuracy, per-class accuracy, macro F1, the confusion matrix, bits/dim under the true label and the
posterior's calibration: ECE (15 bins), the NLL of the true label and the Brier score; beside the
JSON, a reliability diagram as PNG (metrics.json -> metrics.png).

Evidence maps (--explain DIR, --explain-out maps.npz, for all images or the first --explain-limit):
log p(x|c) is a sum of per-pixel terms log p(x_ij | x_<ij, c) (R, G and B together), which the
scoring pass computes anyway. Per pixel, the terms' difference between the predicted label and the
runner-up (by posterior) shows which parts of the image carried the decision, and -log2 of the term
under the predicted label shows what surprised the model. Each image gets a PNG under DIR (at its
id's path, .png): the image, the ratio map on a blue-white-red scale centred at zero, and the bits
map. With --hflip the maps are the mean of the image's terms and its mirror image's (flipped back
onto the pixels they score), so they add up to the CSV's log-likelihoods, as without it.

Under torchrun (nccl on GPUs, gloo on CPUs) each process scores a contiguous shard of the images;
rank 0 gathers them and alone prints and writes, the same files as one process.

A user's mistake (missing or foreign checkpoint, corrupt image, empty folder, bad CSV, labels the
model does not have) ends with one line on stderr and exit code 2, and leaves no output file; under
torchrun, a failure in any process does the same (torchrun then adds its own report).
"""
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import utils
from checkpoint import atomic_write, load_model
from config import (DEFAULTS, EXIT_USER_ERROR, ArgumentParser, UsageError, check_distinct, check_output,
                    first_error, gather_on_main, join_processes, leave_processes, report, run_cli, speed_up_cpu,
                    validation_seed)
from dataset import (DataError, class_name, item_paths, items_digest, list_image_folder, load_images,
                     read_split_csv, root_relative, split_csv_path, split_items, to_model_input)

PROG = "classify.py"
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # CSVs that mark a CPEN455 root
SPLIT_KEYS = ("train_split", "val_split", "val_fraction", "report_fraction", "report_seed")  # + validation_seed
CALIBRATION_BINS = 15


# ---------------------------------------------------------------------------------------------
# Pure functions (tests import these).

def confusion_matrix(true, pred, num_classes):
    """[K, K] int64 counts: rows are the true label, columns the prediction."""
    true, pred = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    return cm


def metrics_from_confusion(cm):
    """Accuracy, per-class accuracy (recall) and macro F1 from a confusion matrix [K, K].

    Per-class accuracy is None for a class with no true examples. Macro F1 averages the per-class
    F1 = 2 TP / (2 TP + FP + FN) over the classes that occur as a true label or a prediction
    (a class that occurs in neither has no defined F1; sklearn's default does the same).
    """
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    tp = np.diag(cm)
    accuracy = tp.sum() / total if total else None
    true_counts, pred_counts = cm.sum(axis=1), cm.sum(axis=0)
    per_class = [float(tp[k] / true_counts[k]) if true_counts[k] else None for k in range(len(cm))]
    per_class_f1 = [float(2 * tp[k] / (true_counts[k] + pred_counts[k]))
                    if true_counts[k] + pred_counts[k] else None for k in range(len(cm))]
    f1 = [f for f in per_class_f1 if f is not None]
    return {
        "n": total,
        "accuracy": float(accuracy) if total else None,
        # The binomial standard error, sqrt(a (1 - a) / n): how far another sample of images may move it.
        "accuracy_standard_error": float(np.sqrt(accuracy * (1 - accuracy) / total)) if total else None,
        "per_class_accuracy": per_class,
        "per_class_f1": per_class_f1,
        "macro_f1": float(np.mean(f1)) if f1 else None,
        "confusion_matrix": cm.tolist(),
    }


def log_prior_from_labels(labels, num_classes):
    """log of the class frequencies among the known labels (-1 ignored), [K] float64.
    A class that never occurs gets log 0 = -inf: it is never predicted."""
    labels = np.asarray([l for l in labels if l >= 0], dtype=np.int64)
    if labels.size == 0:
        raise UsageError("no known labels to estimate the train prior from")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def rank_labels(log_likelihoods, log_prior=None, temperature=1.0):
    """(labels by decreasing posterior [N, K]: the prediction, then the runner-up, ...; posterior
    probabilities [N, K]) from log p(x|c) [N, K] and log p(c) [K] at `temperature` (which changes
    no prediction under a uniform prior). Ties go to the lower label, as argmax breaks them."""
    loglik = torch.as_tensor(np.asarray(log_likelihoods, dtype=np.float64))
    prior = None if log_prior is None else torch.as_tensor(np.asarray(log_prior, dtype=np.float64))
    log_post = utils.log_posterior(loglik, prior, temperature).numpy()
    return np.argsort(-log_post, axis=1, kind="stable"), np.exp(log_post)


def bits_per_dim_true_label(log_likelihoods, labels, image_shape):
    """Mean bits/dim of each image under its true label."""
    loglik = np.asarray(log_likelihoods, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    nll = -loglik[np.arange(len(labels)), labels]
    return float(np.mean(nll) / (math.prod(image_shape) * math.log(2)))


@torch.inference_mode()
@utils.in_eval_mode
def score_images(model, images, num_classes, batch_size, device, progress=True, mirror=False, keep_maps=0):
    """(log p(x|c) in nats [N, K] float64, the per-pixel terms log p(x_ij | x_<ij, c) of the first
    keep_maps images [min(N, keep_maps), K, H, W] float32) for `images`: uint8 [N, 3, H, W], or a
    list of file paths (loaded batch by batch and resized to model.config['image_size']).
    mirror: score each image flipped left-right instead; its maps are flipped back, so that each
    term sits on the pixel it scores. log p(x|c) is the terms' sum, taken in float64 so that a
    map's sum matches the CSV's log-likelihoods to float64 precision."""
    n = len(images)
    image_size = model.config["image_size"]
    out = np.empty((n, num_classes), dtype=np.float64)
    maps = np.empty((min(n, keep_maps), num_classes, image_size, image_size), dtype=np.float32)
    # progress=True shows the bar on a terminal only (tqdm's disable=None), and clears it at the end
    bar = tqdm(total=n, desc="classifying", unit="img", disable=None if progress else True,
               leave=False, dynamic_ncols=True)
    try:
        for start in range(0, n, batch_size):
            batch = images[start:start + batch_size]
            if not torch.is_tensor(batch):
                batch = load_images(batch, image_size, progress=False)
            x = to_model_input(batch.flip(-1) if mirror else batch).to(device)
            pixels = utils.class_pixel_log_likelihoods(model, x, num_classes)  # [b, K, H, W]
            out[start:start + len(batch)] = pixels.double().sum(dim=(2, 3)).cpu().numpy()
            kept = pixels[:max(0, keep_maps - start)]
            maps[start:start + len(kept)] = (kept.flip(-1) if mirror else kept).cpu().numpy()
            bar.update(len(batch))
    finally:
        bar.close()
    return out, maps


def reliability_diagram(posteriors, labels, title, bins=CALIBRATION_BINS, size=420):
    """A PIL image: per bin of the top posterior, the accuracy (blue bars) against the mean
    confidence (red outline: the gap), the diagonal of perfect calibration, and under it the share
    of images in each bin (grey). Pillow draws it: the project does not depend on matplotlib."""
    count, confidence, accuracy = (t.numpy() for t in utils.reliability(posteriors, labels, bins))
    margin, strip = 48, 60  # the axes' margin; the height of the histogram strip under the plot
    image = Image.new("RGB", (size + 2 * margin, size + strip + 2 * margin), "white")
    draw = ImageDraw.Draw(image)
    x0, y0 = margin, margin + size  # the plot's lower-left corner

    def to_x(v):  # probability -> pixel
        return x0 + v * size

    def to_y(v):
        return y0 - v * size
    width = size / bins
    for b in range(bins):
        if count[b] == 0:
            continue
        left, right = x0 + b * width + 1, x0 + (b + 1) * width - 1
        draw.rectangle([left, to_y(accuracy[b]), right, y0], fill=(70, 110, 200))
        low, high = sorted((accuracy[b], confidence[b]))
        draw.rectangle([left, to_y(high), right, to_y(low)], outline=(210, 50, 50), width=2)
        share = count[b] / count.sum()
        draw.rectangle([left, y0 + strip + 20 - share * strip, right, y0 + strip + 20], fill=(150, 150, 150))
    draw.line([to_x(0), to_y(0), to_x(1), to_y(1)], fill=(90, 90, 90), width=1)
    draw.rectangle([x0, to_y(1), to_x(1), y0], outline="black")
    for v in (0, 0.5, 1):
        draw.text((to_x(v) - 8, y0 + 4), f"{v:g}", fill="black")
        draw.text((x0 - 22, to_y(v) - 6), f"{v:g}", fill="black")
    draw.text((x0 + size / 2 - 60, y0 + strip + 26), "top posterior (confidence)", fill="black")
    draw.text((6, margin - 30), "accuracy (blue) vs confidence (red); grey: share of images", fill="black")
    draw.text((6, margin - 16), title, fill="black")
    return image


def evidence_maps(pixel_log_likelihoods, predictions, runners_up):
    """(ratio [N, H, W], bits [N, H, W]) from log p(x_ij | x_<ij, c) [N, K, H, W]: per pixel, the
    log-likelihood ratio of the predicted label to the runner-up in nats (it sums to the difference
    of their log p(x|c)), and -log2 p under the predicted label (it sums to the image's NLL in bits)."""
    terms = np.asarray(pixel_log_likelihoods, dtype=np.float64)
    rows = np.arange(len(terms))
    predicted, runner_up = terms[rows, predictions], terms[rows, runners_up]
    return predicted - runner_up, -predicted / math.log(2)


# Colour maps as evenly spaced stops: blue-white-red (RdBu) centred at zero, and magma-like for bits
DIVERGING = [(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)]
SEQUENTIAL = [(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)]


def colourize(values, low, high, stops):
    """Values [...] -> uint8 RGB [..., 3], linear between the colour stops from `low` to `high`."""
    t = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0, 1)
    t = t * (len(stops) - 1)
    i = np.minimum(t.astype(np.int64), len(stops) - 2)  # the stop at or below t
    f = (t - i)[..., None]
    stops = np.asarray(stops, dtype=np.float64)
    return np.round(stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def explain_figure(image, ratio, bits, title, predicted, runner_up):
    """A PIL image of three panels, each about 160 pixels wide: the image as the model saw it
    (uint8 [3, H, W]), upsampled; the log-likelihood ratio (nats: red where a pixel favours the
    predicted label, blue where it favours the runner-up, white at zero) over a colour bar
    symmetric about zero; the bits under the predicted label over a colour bar from zero."""
    side, line = image.shape[-1] * max(1, 160 // image.shape[-1]), 13
    margin, top, bar = 14, 14 + 3 * line, 10
    figure = Image.new("RGB", (3 * side + 4 * margin, top + side + bar + 2 * line + 8), "white")
    draw = ImageDraw.Draw(figure)
    draw.font = ImageFont.load_default_imagefont()  # the bitmap font: 20x faster than the default
    bound = max(float(np.abs(ratio).max()), 1e-6)  # symmetric, so that white is zero
    panels = [
        (image.transpose(1, 2, 0), [f"predicted {predicted}", f"(runner-up {runner_up})"], None),
        (colourize(ratio, -bound, bound, DIVERGING),
         ["log-likelihood ratio", f"red {predicted}, blue {runner_up}",
          f"sum {ratio.sum():+.2f} nats"], (-bound, bound, DIVERGING)),
        (colourize(bits, 0, bits.max(), SEQUENTIAL),
         [f"bits under {predicted}", f"{bits.mean() / 3:.3f} bits/dim"], (0, float(bits.max()), SEQUENTIAL)),
    ]
    draw.text((margin, 2), title, fill="black")
    for p, (pixels, lines, scale_bar) in enumerate(panels):
        x = margin + p * (side + margin)
        for j, text in enumerate(lines):
            draw.text((x, 4 + (j + 1) * line), text, fill="black")
        panel = Image.fromarray(np.ascontiguousarray(pixels)).resize((side, side), Image.NEAREST)
        figure.paste(panel, (x, top))
        if scale_bar is None:
            continue
        low, high, stops = scale_bar
        y = top + side + 4
        ramp = colourize(np.linspace(low, high, side)[None].repeat(bar, axis=0), low, high, stops)
        figure.paste(Image.fromarray(ramp), (x, y))
        draw.rectangle([x, y, x + side - 1, y + bar - 1], outline="black")
        for value, at in [(low, 0.0), (high, 1.0)] + ([(0.0, 0.5)] if low < 0 else []):
            text = f"{value:.3g}"
            draw.text((x + at * (side - 1) - at * draw.textlength(text), y + bar + 2), text, fill="black")
    return figure


# ---------------------------------------------------------------------------------------------
# Input, output.

def find_inputs(data_dir, split, csv_path, num_classes):
    """(items [(id, label)], file paths, csv used or None) for a CPEN455 root (`split`: None for
    test) or a plain folder (`split` None)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    split_csv = split_csv_path(data_dir, split or "test")
    if split is not None and not os.path.isfile(split_csv):
        raise DataError(f"--split {split}: {split_csv} not found")
    if csv_path is None and os.path.isfile(split_csv):
        csv_path = split_csv
    if csv_path is not None:
        items = read_split_csv(data_dir, csv_path, num_classes=num_classes)
        return items, item_paths(data_dir, csv_path, items), csv_path
    present = [name for name in SPLIT_NAMES if os.path.isfile(split_csv_path(data_dir, name))]
    if present:
        raise DataError(f"{split_csv} not found, but {data_dir} has "
                        f"{', '.join(n + '.csv' for n in present)}: pass --split or --csv")
    items = list_image_folder(data_dir)
    return items, item_paths(data_dir, None, items), None


def held_out_inputs(data_dir, which, runs, checkpoints, num_classes):
    """(items with ids relative to data_dir, file paths, a description) of the `which` ("val" or
    "report") images that the checkpoints' training run held out, from its stored split keys;
    UsageError where they are not the images it held out (`runs`: each checkpoint's "config" and
    "held_out_digest", which checkpoints from before it lack)."""
    # Keys a checkpoint predates take their defaults, which are what that code did (no report split).
    configs = [{**DEFAULTS, **run["config"]} for run in runs]
    splits = [{**{key: config[key] for key in SPLIT_KEYS}, "seed": validation_seed(config)}
              for config in configs]
    for path, split in zip(checkpoints, splits):
        if split != splits[0]:
            raise UsageError(f"--held-out: {checkpoints[0]} and {path} held out different images; "
                             f"score them one at a time")
    c = splits[0]
    _, val_items, report_items, val_csv = split_items(
        data_dir, c["train_split"], c["val_split"], c["val_fraction"], c["seed"], num_classes,
        c["report_fraction"], c["report_seed"])
    train_csv = split_csv_path(data_dir, c["train_split"])
    chosen, csv_path = (val_items, val_csv) if which == "val" else (report_items, train_csv)
    if not chosen:
        raise UsageError(f"--held-out {which}: the run of {checkpoints[0]} held out no {which} images "
                         f"(its {which}_fraction is 0)")
    items = root_relative(data_dir, csv_path, chosen)
    digest = items_digest(items)
    for path, run in zip(checkpoints, runs):
        stored = (run["held_out_digest"] or {}).get(which)
        if stored is not None and stored != digest:
            raise UsageError(f"--held-out {which}: {data_dir} now gives other images than the run of {path} "
                             f"held out (its CSVs changed since?); score its splits/{which}.csv with --csv")
    source = f"the {which} split of {checkpoints[0]}'s run"
    unchecked = [path for path, run in zip(checkpoints, runs) if (run["held_out_digest"] or {}).get(which) is None]
    if unchecked:  # the shipped checkpoints among them
        source += (f" (unchecked: {unchecked[0]} predates the fingerprint of the images its run held out; "
                   f"that run read {configs[checkpoints.index(unchecked[0])]['data_dir']})")
    trained = [(path, config["train_on_held_out"]) for path, config in zip(checkpoints, configs)
               if which in config["train_on_held_out"].split("+")]
    if trained:  # one expert that saw these images makes the product's figures training figures
        path, trained_on = trained[0]
        source += f", which {path}'s run also trained on (train_on_held_out {trained_on}): training figures"
    return items, item_paths(data_dir, None, items), source


def csv_text(ids, predictions, log_likelihoods, posteriors):
    k = log_likelihoods.shape[1]
    header = (["id", "label"] + [f"loglik_{class_name(c)}" for c in range(k)]
              + [f"posterior_{class_name(c)}" for c in range(k)])
    lines = [",".join(header)]
    for item_id, pred, ll, post in zip(ids, predictions, log_likelihoods, posteriors):
        if any(ch in item_id for ch in ',"\n\r'):
            item_id = '"' + item_id.replace('"', '""') + '"'
        lines.append(",".join([item_id, str(int(pred))] + [format(v, ".10g") for v in ll]
                              + [format(v, ".6g") for v in post]))
    return "\n".join(lines) + "\n"


def format_metrics(metrics):
    k = len(metrics["confusion_matrix"])
    names = [class_name(c) for c in range(k)]
    cm = np.asarray(metrics["confusion_matrix"])
    lines = [f"accuracy {metrics['accuracy']:.4f} ({int(np.trace(cm))}/{metrics['n']}; standard error "
             f"{metrics['accuracy_standard_error']:.4f})"]
    per_class = []
    for c in range(k):
        acc = metrics["per_class_accuracy"][c]
        per_class.append(f"{names[c]} {'n/a' if acc is None else f'{acc:.4f}'} "
                         f"({int(cm[c, c])}/{int(cm[c].sum())})")
    lines.append("per-class accuracy: " + ", ".join(per_class))
    lines.append(f"macro F1 {metrics['macro_f1']:.4f}")
    lines.append(f"bits/dim under the true label {metrics['bits_per_dim']:.4f}")
    lines.append(f"posterior at T = {metrics['temperature']:.4g}: ECE ({CALIBRATION_BINS} bins) "
                 f"{metrics['ece']:.4f} (bootstrap standard error {metrics['ece_standard_error']:.4f}), "
                 f"NLL of the true label {metrics['nll']:.4f}, Brier {metrics['brier']:.4f}")
    width = max(len(n) for n in names + [str(int(cm.max()))]) + 1
    lines.append("confusion matrix (rows: true label, columns: prediction)")
    lines.append(" " * width + "".join(n.rjust(width) for n in names))
    for c in range(k):
        lines.append(names[c].ljust(width) + "".join(str(int(v)).rjust(width) for v in cm[c]))
    return "\n".join(lines)


def build_parser():
    p = ArgumentParser(prog=PROG, description="Label images by Bayes' rule over a conditional "
                      "PixelCNN++'s class likelihoods and write a CSV.")
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CHECKPOINT",
                   help="a checkpoint written by train.py; several: a product of experts (the mean of "
                        "their log p(x|c))")
    p.add_argument("--data-dir", required=True,
                   help="a CPEN455-layout root (with <split>.csv) or a plain folder of images")
    p.add_argument("--split", default=None, help="which <split>.csv of a CPEN455 root (default test)")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="take the files (and labels) from this CSV instead of <data-dir>/<split>.csv; "
                        "ids are relative to --data-dir")
    p.add_argument("--held-out", choices=("val", "report"), default=None,
                   help="score the images the checkpoint's training run held out (its validation or "
                        "report split), recomputed from <data-dir> with the run's stored seeds and fractions")
    p.add_argument("--out", required=True, help="the predictions CSV to write")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per forward pass (each is scored under all K labels: K x this; default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--prior", choices=("uniform", "train", "fitted"), default="uniform",
                   help="p(c): uniform, the label frequencies of <data-dir>/train.csv, or the prior "
                        "fitted with its own temperature on the validation split (stored by train.py); default uniform")
    p.add_argument("--hflip", action="store_true",
                   help="also score each image mirrored left-right and classify by the mean of the "
                        "two log-likelihoods (twice the time)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="the posterior's temperature (default: the one stored in the checkpoint)")
    p.add_argument("--logits", default=None, help="also save log p(x|c) [N, K] (nats) as .npy")
    p.add_argument("--metrics-out", default=None,
                   help="save the metrics (labelled inputs) as JSON, and a reliability diagram beside "
                        "it (.png)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="write one PNG per image under DIR: the image, the per-pixel log-likelihood "
                        "ratio of the predicted label to the runner-up, and the bits under the prediction")
    p.add_argument("--explain-limit", type=int, default=None, metavar="N",
                   help="explain only the first N images (default: all)")
    p.add_argument("--explain-out", default=None, metavar="FILE",
                   help="save the maps as .npz: ratio/<id> and bits/<id> [H, W], labels/<id> "
                        "(predicted, runner-up)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_options(args):
    chosen = [option for option, value in (("--split", args.split), ("--csv", args.csv),
                                           ("--held-out", args.held_out)) if value is not None]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} both choose the images; give one")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    diagram = os.path.splitext(args.metrics_out)[0] + ".png" if args.metrics_out is not None else None
    outputs = [("--out", args.out), ("--logits", args.logits), ("--metrics-out", args.metrics_out),
               ("--metrics-out's diagram", diagram), ("--explain-out", args.explain_out)]
    for option, path in outputs:
        if path is not None:
            check_output(option, path)
    check_distinct(outputs, [("--csv", args.csv)] + [("--checkpoint", path) for path in args.checkpoint])
    if args.explain is not None:
        check_output("--explain", args.explain, folder=True)
    if args.explain_limit is not None:
        if args.explain_limit < 1:
            raise UsageError(f"--explain-limit must be >= 1, got {args.explain_limit}")
        if args.explain is None and args.explain_out is None:
            raise UsageError("--explain-limit needs --explain DIR or --explain-out FILE")
    if args.temperature is not None and not 0 < args.temperature < math.inf:
        raise UsageError(f"--temperature must be a positive number, got {args.temperature}")


def load_experts(checkpoints, device, temperature, say):
    """-> (the EMA models of the checkpoints, the posterior's temperature, their fitted priors or
    None, their runs' {"config", "held_out_digest"}): --temperature if given, else the mean of the
    checkpoints' stored ones (1, with a note, where one has none). The models must agree on their
    labels and image size."""
    models, stored, fitted, runs = [], [], [], []
    for path in checkpoints:
        model, state = load_model(path, device)
        if model.config["num_classes"] < 1:
            raise UsageError(f"{path}: an unconditional model (num_classes 0) cannot classify")
        first = models[0].config if models else model.config
        for key in ("num_classes", "image_size"):
            if model.config[key] != first[key]:
                raise UsageError(f"{path} has {key} {model.config[key]} but {checkpoints[0]} has "
                                 f"{first[key]}: a product of experts needs the same labels and images")
        models.append(model)
        stored.append(state.get("temperature"))
        fitted.append(state.get("fitted_prior"))
        runs.append({"config": state.get("config", {}), "held_out_digest": state.get("held_out_digest")})
    if temperature is not None:
        return models, temperature, fitted, runs
    for path, value in zip(checkpoints, stored):
        if value is not None and not 0 < value < math.inf:  # NaN fails too
            raise UsageError(f"{path}: its stored temperature, {value}, is not a positive number; "
                             f"pass --temperature T to set one")
    if None in stored:
        say(f"{PROG}: {checkpoints[stored.index(None)]} has no fitted temperature (it predates "
            f"calibration, or its run had no validation split): posteriors at T = 1, near-certain; "
            f"pass --temperature T to set one")
        return models, 1.0, fitted, runs
    if len(models) > 1:
        say(f"{PROG}: {len(models)} experts; posteriors at the mean of their temperatures, "
            f"{sum(stored) / len(stored):.4g} (fit one on held-out images: bench/calibration.py)")
    return models, sum(stored) / len(stored), fitted, runs


def stored_prior(checkpoints, fitted, temperature):
    """-> (log p(c) [K], T) for --prior fitted: the prior and the temperature that were fitted
    together on the validation split (the mean over experts); --temperature overrides T."""
    if None in fitted:
        raise UsageError(f"--prior fitted: {checkpoints[fitted.index(None)]} has no fitted prior; fit one "
                         f"on held-out images with bench/calibration.py --save, or use another --prior")
    log_prior = torch.tensor([f["log_prior"] for f in fitted], dtype=torch.float64).mean(0).log_softmax(0)
    if temperature is None:
        temperature = sum(f["temperature"] for f in fitted) / len(fitted)
    return log_prior.numpy(), temperature


def shard(n, rank, world_size):
    """This process's contiguous share of n inputs; the shards in rank order are the input order."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def score_all(models, paths, num_classes, args, rank, world_size, device, keep_maps):
    """Score this process's shard and gather every shard on rank 0 -> (log p(x|c) of the images as
    given [N, K], the scores that classify [N, K], their per-pixel terms for the first keep_maps
    images [n, K, H, W]) on rank 0, None elsewhere. Each is the mean over the models (a product
    of experts); with --hflip the scores and the terms are also the means over the image and its
    mirror image. If any process fails (a corrupt image in its shard), every process raises, and
    rank 0's error names the failure."""
    mine = shard(len(paths), rank, world_size)
    keep = max(0, min(keep_maps, mine.stop) - mine.start)

    def score(mirror):  # -> the models' mean (log p(x|c) [n, K], per-pixel terms [k, K, H, W])
        scored = [score_images(model, paths[mine], num_classes, args.batch_size, device, mirror=mirror,
                               progress=rank == 0 and not args.no_progress, keep_maps=keep)
                  for model in models]
        return tuple(sum(parts) / len(models) for parts in zip(*scored))
    error, result = None, None
    try:
        loglik, maps = score(mirror=False)
        result = (loglik, loglik, maps)
        if args.hflip:
            mirrored, mirrored_maps = score(mirror=True)
            result = (loglik, (loglik + mirrored) / 2, (maps + mirrored_maps) / 2)
    except UsageError as err:  # also DataError
        error = str(err)
    parts = gather_on_main(result)
    error = first_error(error)
    if error is not None:
        raise UsageError(error)
    if rank != 0:
        return None
    return tuple(np.concatenate([part[i] for part in parts]) for i in range(3))


def explain_paths(directory, ids):
    """<directory>/<id>.png for each id (its extension replaced, its folders kept); UsageError for
    an id that would land outside the directory (..) or on another id's file (a.jpg, a.png)."""
    paths = {}
    for item_id in ids:
        relative = os.path.normpath(os.path.splitext(item_id)[0] + ".png")
        if os.path.isabs(relative) or relative.split(os.sep)[0] == "..":
            raise UsageError(f"--explain: image id {item_id!r} would put its map outside {directory}")
        if relative in paths:
            raise UsageError(f"--explain: image ids {paths[relative]!r} and {item_id!r} would share one map file")
        paths[relative] = item_id
    return [os.path.join(directory, relative) for relative in paths]


def check_map_paths(map_paths, ids, paths):
    """UsageError now, not after the scoring, where a map cannot be written (a folder in its place,
    or a file in place of its folder) or would be written over an image being classified."""
    inputs = {os.path.realpath(path): item_id for item_id, path in zip(ids, paths)}
    for path in map_paths:
        check_output("--explain", path)
        overwritten = inputs.get(os.path.realpath(path))
        if overwritten is not None:
            raise UsageError(f"--explain: the map {path} would overwrite the image {overwritten!r}; "
                             f"give a folder apart from the images")


def write_explanations(args, ids, paths, image_size, maps, ranking, posteriors):
    """One PNG per image under --explain, and the maps in --explain-out (.npz, keyed by id)."""
    ratio, bits = evidence_maps(maps, ranking[:len(maps), 0], ranking[:len(maps), 1])
    if args.explain is not None:
        images = load_images(paths[:len(maps)], image_size, progress=False)  # as the model saw them
    arrays = {}
    for i, item_id in enumerate(ids[:len(maps)]):
        predicted, runner_up = (class_name(c) for c in ranking[i, :2])
        arrays.update({f"ratio/{item_id}": ratio[i].astype(np.float32),
                       f"bits/{item_id}": bits[i].astype(np.float32), f"labels/{item_id}": ranking[i, :2]})
        if args.explain is not None:
            title = f"{item_id}: {predicted} (posterior {posteriors[i, ranking[i, 0]]:.3g})"
            figure = explain_figure(images[i].numpy(), ratio[i], bits[i], title, predicted, runner_up)
            path = explain_paths(args.explain, [item_id])[0]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            figure.save(path, compress_level=1)  # as sample.py's images: no fsync; fast to encode
    if args.explain_out is not None:
        atomic_write(args.explain_out, lambda f: np.savez(f, **arrays))


def describe_prior(log_prior):
    return ", ".join(f"{class_name(c)} {math.exp(v):.4f}" for c, v in enumerate(log_prior))


def choose_prior(args, num_classes, fitted, temperature, say):
    """-> (log p(c) [K] or None, the temperature to use with it): --prior none, train (train.csv's
    label frequencies) or fitted (stored in the checkpoints, with the temperature fitted with it)."""
    if args.prior == "train":
        train_csv = split_csv_path(args.data_dir, "train")
        if not os.path.isfile(train_csv):
            raise DataError(f"--prior train needs {train_csv}, which does not exist")
        train_items = read_split_csv(args.data_dir, train_csv, num_classes=num_classes)
        log_prior = log_prior_from_labels([label for _, label in train_items], num_classes)
        say(f"prior from {train_csv}: {describe_prior(log_prior)}")
        return log_prior, temperature
    if args.prior == "fitted":
        log_prior, temperature = stored_prior(args.checkpoint, fitted, args.temperature)
        say(f"prior fitted on the validation split, at T = {temperature:.4g}: {describe_prior(log_prior)}")
        return log_prior, temperature
    return None, temperature


def labelled_metrics(args, labels, predictions, loglik, posteriors, temperature, image_size, source):
    """The metrics of images whose labels are all known: accuracy and F1 (metrics_from_confusion),
    bits/dim under the true label, calibration, and what produced them."""
    num_classes = posteriors.shape[1]
    metrics = metrics_from_confusion(confusion_matrix(labels, predictions, num_classes))
    metrics["bits_per_dim"] = bits_per_dim_true_label(loglik, labels, (3, image_size, image_size))
    metrics["temperature"] = temperature
    metrics.update(utils.calibration_metrics(posteriors, labels, bins=CALIBRATION_BINS))
    metrics["ece_standard_error"] = utils.ece_standard_error(posteriors, labels, bins=CALIBRATION_BINS)
    metrics["class_names"] = [class_name(c) for c in range(num_classes)]
    metrics["prior"] = args.prior
    metrics["hflip"] = args.hflip
    metrics["checkpoint"] = args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint
    metrics["source"] = source
    return metrics


def run(args, rank, world_size, device):
    say = print if rank == 0 else (lambda *_: None)  # under torchrun only rank 0 prints
    models, temperature, fitted, runs = load_experts(args.checkpoint, device, args.temperature, say)
    model = models[0]
    num_classes = model.config["num_classes"]
    explaining = args.explain is not None or args.explain_out is not None
    if explaining and num_classes < 2:
        raise UsageError(f"--explain compares two labels; {args.checkpoint[0]} has {num_classes}")

    if args.held_out is not None:
        items, paths, source = held_out_inputs(args.data_dir, args.held_out, runs, args.checkpoint,
                                               num_classes)
    else:
        items, paths, csv_used = find_inputs(args.data_dir, args.split, args.csv, num_classes)
        source = csv_used if csv_used is not None else f"{args.data_dir} (folder)"
    log_prior, temperature = choose_prior(args, num_classes, fitted, temperature, say)

    ids, labels = [i for i, _ in items], np.array([l for _, l in items], dtype=np.int64)
    repeated = len(ids) - len(set(ids))
    if repeated:
        source += f" ({repeated} of them repeat an image listed before: each is scored and counted)"
    processes = f"; {world_size} processes" if world_size > 1 else ""
    say(f"{PROG}: {len(items)} images from {source}; {num_classes} classes; image size "
        f"{model.config['image_size']}; device {device}{processes}")
    keep_maps = (args.explain_limit or len(paths)) if explaining else 0
    if args.explain is not None:  # a clash, a climb out of DIR or an image overwritten: before scoring
        check_map_paths(explain_paths(args.explain, ids[:keep_maps]), ids, paths)
    start = time.perf_counter()
    scored = score_all(models, paths, num_classes, args, rank, world_size, device, keep_maps)
    elapsed = time.perf_counter() - start
    if rank != 0:
        return 0
    loglik, scores, maps = scored
    ranking, posteriors = rank_labels(scores, log_prior, temperature)
    predictions = ranking[:, 0]

    metrics = None
    if labels.size and (labels >= 0).all():
        metrics = labelled_metrics(args, labels, predictions, loglik, posteriors, temperature,
                                   model.config["image_size"], source)

    if explaining:
        write_explanations(args, ids, paths, model.config["image_size"], maps, ranking, posteriors)
    if args.logits is not None:
        atomic_write(args.logits, lambda f: np.save(f, scores))
    if args.metrics_out is not None and metrics is not None:
        atomic_write(args.metrics_out, lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        diagram = reliability_diagram(posteriors, labels, f"T = {temperature:.3g}, ECE {metrics['ece']:.3f}")
        atomic_write(os.path.splitext(args.metrics_out)[0] + ".png", lambda f: diagram.save(f, format="PNG"))
    text = csv_text(ids, predictions, scores, posteriors)
    atomic_write(args.out, lambda f: f.write(text.encode()))

    if metrics is not None:
        print(format_metrics(metrics))
    elif (labels >= 0).any():
        print(f"labels are known for {(labels >= 0).sum()} of {labels.size} images; metrics need "
              "all of them (use --csv with the labelled rows only)")
    if metrics is None and args.metrics_out is not None:
        print(f"no metrics (the labels are unknown); {args.metrics_out} not written")
    print(f"{PROG}: {len(items)} images in {elapsed:.1f} s ({len(items) / max(elapsed, 1e-9):.1f} "
          f"images/s) on {device}; wrote {args.out}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    code, rank = EXIT_USER_ERROR, 0
    try:
        check_options(args)
        rank, world_size, device = join_processes(args.device)
        code = run(args, rank, world_size, device)
    except UsageError as err:  # also DataError and CheckpointError
        code = report(PROG, err) if rank == 0 else EXIT_USER_ERROR
    finally:
        leave_processes(succeeded=code == 0)
    return code


if __name__ == "__main__":
    speed_up_cpu()  # faster on CPUs: see config
    run_cli(main)
