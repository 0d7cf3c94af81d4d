"""Draw images of each class from a conditional PixelCNN++, save them, and score them with FID.

    python sample.py --checkpoint C --out-dir samples/ [--n-per-class 25] [--classes 0,2]
                     [--batch-size N] [--seed S] [--device auto|cpu|cuda] [--sampler fast|naive]
                     [--fid-ref DIR] [--fid-ref-split train] [--fid-dims 2048] [--fid-weights PATH]

Writes <out-dir>/grid_ClassK.png (one grid per class) and <out-dir>/ClassK/0000.png, ... (single
8-bit PNGs), with the checkpoint's EMA weights. The same --seed (and --batch-size) gives the same
images: the images of class K, batch b come from a generator seeded with a number derived from
(--seed, K, b) alone, so they do not depend on which other classes are drawn.

--sampler fast (default) is the cached sampler of fast_sampler.py; --sampler naive is the
reference, one full forward pass per pixel. Both draw the same random numbers in the same order.

--fid-ref DIR computes FID (pytorch-fid's Inception features, --fid-dims of 64, 192, 768 or 2048)
between the generated images and DIR, pooled over the drawn classes and per class. DIR can be
  - a folder with ClassK/ subfolders (for example another sample.py output): per class and pooled;
  - a CPEN455-layout root with <fid-ref-split>.csv (default train.csv): per class from its labels,
    pooled over the rows of the drawn classes (all rows when labels are unknown);
  - a plain folder of images: pooled only.
Reference images are resized to the model's image size, as for training, so that both sets have
the same resolution. With no more images in a set than feature dimensions, the covariance is
singular and FID is biased upward and unstable; the tool warns (the course's 192 dims on 100
images was such a case). pytorch-fid downloads its Inception weights on first use; offline, pass
--fid-weights PATH (the file pt_inception-2015-12-05-6726825d.pth), or put that file in
$TORCH_HOME/hub/checkpoints/.
"""
import json
import math
import os
import re
import socket
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import utils
from checkpoint import CheckpointError, load_model
from config import ArgumentParser, UsageError, report, resolve_device, reuse_freed_memory
from dataset import (DataError, class_name, item_paths, list_image_folder, load_images,
                     read_split_csv, split_csv_path)
from fast_sampler import generate_fast

PROG = "sample.py"
FID_DIMS = (64, 192, 768, 2048)
UNCONDITIONAL_NAME = "Unconditional"


class FIDWeightsError(Exception):
    """The Inception weights for FID cannot be had; the message says how to supply them."""




# ---------------------------------------------------------------------------------------------
# Sampling.

@torch.inference_mode()
def generate_naive(model, labels, generator, progress=None, n=None):
    """The reference sampler: one full forward pass per pixel, in raster order. Float images in
    [-1, 1] on the 256 levels, [B, 3, H, W], in the model's dtype. labels: [B] or None (then n
    images from the unconditional model). One mixture_noise draw per pixel, in raster order."""
    model.eval()
    param = next(model.parameters())
    batch = labels.shape[0] if labels is not None else n
    if batch is None:
        raise ValueError("an unconditional batch needs n (the number of images)")
    size = model.config["image_size"]
    x = torch.zeros(batch, 3, size, size, device=param.device, dtype=param.dtype)
    for i in range(size):
        for j in range(size):
            params = model(x, labels)[:, :, i:i + 1, j:j + 1]
            x[:, :, i:i + 1, j:j + 1] = utils.sample_from_discretized_mix_logistic(params, generator)
            if progress is not None:
                progress.update(1)
    return x


def to_uint8(x):
    """Images in [-1, 1] on the 256 levels -> uint8: round((x + 1) * 127.5)."""
    return torch.round((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def generate(model, labels, sampler="fast", seed=0, n=None, progress=None):
    """Sample uint8 images [B, 3, H, W] (H = W = model.config['image_size']) with the model's own
    dtype and device. labels: LongTensor [B], or None for an unconditional model (then give n).
    The generator is torch.Generator(device).manual_seed(seed); `sampler` is 'fast' or 'naive'.
    progress: a tqdm-like object updated once per pixel, or None."""
    if sampler not in ("fast", "naive"):
        raise ValueError(f"sampler must be 'fast' or 'naive', got {sampler!r}")
    param = next(model.parameters())
    generator = torch.Generator(param.device).manual_seed(seed)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=param.device)
    if sampler == "naive":
        images = generate_naive(model, labels, generator, progress=progress, n=n)
    else:
        images = generate_fast(model, labels, generator, progress=progress, n=n)
    return to_uint8(images)


def derive_seed(seed, class_index, chunk):
    """The generator seed of batch `chunk` of class `class_index` (-1: unconditional)."""
    return int(np.random.SeedSequence([seed, class_index + 1, chunk]).generate_state(1)[0])


def save_images(images, out_dir, name):
    """uint8 [N, 3, H, W] -> <out_dir>/grid_<name>.png and <out_dir>/<name>/0000.png, ..."""
    import torchvision
    from PIL import Image
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    images = images.cpu()
    for index, image in enumerate(images):  # 8-bit RGB PNGs (torchvision.io's PNG writer is deprecated)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{index:04d}.png"))
    nrow = max(1, math.ceil(math.sqrt(len(images))))
    grid_path = os.path.join(out_dir, f"grid_{name}.png")
    torchvision.utils.save_image(images.float() / 255.0, grid_path, nrow=nrow, padding=2)
    stale = [f for f in os.listdir(folder)
             if re.fullmatch(r"\d{4,}\.png", f) and int(f.split(".")[0]) >= len(images)]
    return grid_path, folder, len(stale)


# ---------------------------------------------------------------------------------------------
# FID.

def fid_from_features(feats_a, feats_b):
    """The Frechet distance between Gaussians fitted to two feature sets [N, D] (N >= 2 each),
    computed by pytorch_fid.fid_score.calculate_frechet_distance."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy's sqrtm(disp=...) in pytorch-fid
        return float(calculate_frechet_distance(mu_a, cov_a, mu_b, cov_b))


@torch.inference_mode()
def extract_features(images, extractor, batch_size=50, device="cpu"):
    """uint8 images [N, 3, H, W] -> features [N, D] float64. `extractor` maps float images in
    [0, 1] [B, 3, H, W] to [B, D] (or [B, D, 1, 1]), as pytorch-fid's Inception wrapper does."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float() / 255.0
        out.append(extractor(x).reshape(len(x), -1).double().cpu())
    return torch.cat(out).numpy()


class InceptionFeatures(torch.nn.Module):
    """pytorch-fid's InceptionV3 as an extractor: [B, 3, H, W] in [0, 1] -> [B, dims]; maps from
    the blocks before the last are average-pooled, as pytorch_fid.fid_score.get_activations does."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        feats = self.net(x)[0]
        if feats.shape[2:] != (1, 1):
            feats = torch.nn.functional.adaptive_avg_pool2d(feats, (1, 1))
        return feats.flatten(1)


def inception_weights_path(weights=None):
    """The local file of pytorch-fid's Inception weights: `weights` if given, else torch hub's
    cache, downloading it there when missing. FIDWeightsError (saying how to supply them) otherwise."""
    from pytorch_fid.inception import FID_WEIGHTS_URL
    if weights is not None:
        if not os.path.isfile(weights):
            raise FIDWeightsError(f"--fid-weights file not found: {weights}")
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    if os.path.isfile(cached):
        return cached
    print(f"downloading pytorch-fid's Inception weights to {cached}", flush=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached, progress=False)
    except Exception as err:  # offline: URLError, timeouts, HTTP errors, ...
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise FIDWeightsError(
            f"cannot download pytorch-fid's Inception weights ({reason}); on a machine with internet "
            f"fetch {FID_WEIGHTS_URL}, then pass --fid-weights PATH or copy it to {cached}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return cached


def inception_extractor(dims=2048, weights=None, device="cpu"):
    """pytorch-fid's InceptionV3 (FID weights) returning `dims` features, built from a local
    weights file (see inception_weights_path) without any other download."""
    from unittest import mock

    from pytorch_fid import inception as fid_inception
    if dims not in fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM:
        raise UsageError(f"--fid-dims must be one of {FID_DIMS}, got {dims}")
    path = inception_weights_path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise FIDWeightsError(f"{path}: not a loadable weights file ({reason})") from None
    if not isinstance(state, dict):
        raise FIDWeightsError(f"{path}: not a state_dict of pytorch-fid's Inception")
    block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    try:
        # InceptionV3 gets its weights through load_state_dict_from_url; hand it the local ones.
        with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
            net = fid_inception.InceptionV3([block])
    except (RuntimeError, KeyError, ValueError) as err:
        reason = " ".join(str(err).split())[:160]
        raise FIDWeightsError(f"{path}: not pytorch-fid's Inception weights ({reason})") from None
    return InceptionFeatures(net).to(device).eval()


def reference_set(ref_dir, split, num_classes, image_size, classes=None):
    """(uint8 images [N, 3, S, S], labels [N] with -1 for unknown) of a FID reference folder:
    ClassK/ subfolders, a CPEN455 root with <split>.csv, or a plain folder (see the module doc).
    With known labels, only the rows of `classes` (class indices; None = all) are kept."""
    if not os.path.isdir(ref_dir):
        raise DataError(f"--fid-ref folder not found: {ref_dir}")
    names = [class_name(k) for k in range(num_classes)]
    class_dirs = [(k, os.path.join(ref_dir, n)) for k, n in enumerate(names)
                  if os.path.isdir(os.path.join(ref_dir, n))]
    paths, labels = [], []
    if class_dirs:
        for k, folder in class_dirs:
            items = list_image_folder(folder)
            paths += item_paths(folder, None, items)
            labels += [k] * len(items)
    elif os.path.isfile(split_csv_path(ref_dir, split)):
        csv_path = split_csv_path(ref_dir, split)
        items = read_split_csv(ref_dir, csv_path, num_classes=num_classes or None)
        paths, labels = item_paths(ref_dir, csv_path, items), [label for _, label in items]
    else:
        items = list_image_folder(ref_dir)
        paths, labels = item_paths(ref_dir, None, items), [-1] * len(items)
    labels = np.asarray(labels, dtype=np.int64)
    if classes is not None and (labels >= 0).all():
        keep = np.isin(labels, list(classes))
        if not keep.any():
            raise DataError(f"--fid-ref {ref_dir}: no reference images of the drawn classes")
        paths, labels = [p for p, k in zip(paths, keep) if k], labels[keep]
    return load_images(paths, image_size), labels


def compute_fid(gen_feats, gen_labels, ref_feats, ref_labels, dims=None):
    """FID pooled and per class, from features [N, D] and labels [N] (class indices, -1 unknown).

    Returns (results {"pooled" | "ClassK": {"fid", "n_generated", "n_reference"}}, warning lines).
    Per-class scores need a labelled reference; a class gets one when both sets have at least 2
    of its images. A warning names every set with no more images than feature dimensions."""
    gen_labels, ref_labels = np.asarray(gen_labels), np.asarray(ref_labels)
    dims = gen_feats.shape[1] if dims is None else dims
    groups = [("pooled", np.ones(len(gen_labels), bool), np.ones(len(ref_labels), bool))]
    if (ref_labels >= 0).any():
        groups += [(class_name(k), gen_labels == k, ref_labels == k)
                   for k in sorted(set(gen_labels.tolist()) - {-1})]
    results, few, skipped = {}, [], []
    for name, gen_mask, ref_mask in groups:
        n_gen, n_ref = int(gen_mask.sum()), int(ref_mask.sum())
        counts = f"{name} ({n_gen} generated, {n_ref} reference)"
        if n_gen < 2 or n_ref < 2:
            skipped.append(counts)
            continue
        results[name] = {"fid": fid_from_features(gen_feats[gen_mask], ref_feats[ref_mask]),
                         "n_generated": n_gen, "n_reference": n_ref}
        if min(n_gen, n_ref) <= dims:
            few.append(counts)
    messages = []
    if few:
        smaller = [str(d) for d in FID_DIMS if d < dims]
        messages.append(
            f"warning: FID on no more images than its {dims} feature dimensions: {'; '.join(few)}. "
            "The covariance is singular, so the score is biased upward and not comparable across "
            f"sample sizes; use more than {dims} images per set"
            + (f" or a smaller --fid-dims ({', '.join(smaller)})" if smaller else ""))
    if skipped:
        messages.append(f"warning: no FID for {'; '.join(skipped)}: it needs at least 2 images per set")
    return results, messages


# ---------------------------------------------------------------------------------------------
# The command line.

def parse_classes(text, num_classes):
    if num_classes == 0:
        if text is not None:
            raise UsageError("--classes: the model is unconditional (num_classes 0)")
        return [None]
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise UsageError(f"--classes must be class indices like 0,2, got {text!r}") from None
    bad = [k for k in classes if not 0 <= k < num_classes]
    if bad or not classes:
        raise UsageError(f"--classes {text!r}: the model has classes 0..{num_classes - 1}")
    return sorted(set(classes), key=classes.index)


def build_parser():
    p = ArgumentParser(prog=PROG, description="Draw images of each class from a conditional "
                      "PixelCNN++ checkpoint, save grids and single PNGs, and optionally score FID.",
                      epilog="--fid-ref DIR is a folder of ClassK/ subfolders (FID per class and "
                      "pooled), a CPEN455-layout root with <fid-ref-split>.csv (per class from its "
                      "labels), or a plain folder of images (pooled only). Reference images are "
                      "resized to the model's image size. Offline, pass --fid-weights with the file "
                      "pt_inception-2015-12-05-6726825d.pth from pytorch-fid's releases.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    p.add_argument("--out-dir", required=True, help="where grid_ClassK.png and ClassK/NNNN.png go")
    p.add_argument("--n-per-class", type=int, default=25, metavar="N", help="images per class (default 25)")
    p.add_argument("--classes", default=None, help="comma-separated class indices (default: all)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per sampling batch (default: --n-per-class); part of what --seed fixes")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--sampler", choices=("fast", "naive"), default="fast",
                   help="fast: cached incremental sampler (default); naive: one forward pass per pixel")
    p.add_argument("--fid-ref", default=None, metavar="DIR", help="compute FID against the images in DIR (see below)")
    p.add_argument("--fid-ref-split", default="train",
                   help="for a CPEN455-layout --fid-ref: which <split>.csv (default train)")
    p.add_argument("--fid-dims", type=int, default=2048, choices=FID_DIMS,
                   help="Inception feature dimensions (default 2048)")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="local pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--fid-batch-size", type=int, default=50, help="images per Inception pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args, extractor=None):
    """The CLI's work. `extractor` replaces pytorch-fid's Inception (tests pass a tiny network)."""
    for option in ("n_per_class", "fid_batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir} exists and is not a folder")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    num_classes, size = model.config["num_classes"], model.config["image_size"]
    classes = parse_classes(args.classes, num_classes)
    batch_size = args.batch_size or args.n_per_class

    # FID set-up first: a missing weights file or a bad reference folder should stop us before
    # minutes of sampling, not after.
    ref = None
    if args.fid_ref is not None:
        if extractor is None:
            extractor = inception_extractor(args.fid_dims, args.fid_weights, device)
        ref_images, ref_labels = reference_set(args.fid_ref, args.fid_ref_split, num_classes, size,
                                               None if num_classes == 0 else classes)
        print(f"FID reference: {len(ref_images)} images from {args.fid_ref} (resized to {size}x{size})"
              + ("" if num_classes == 0 or (ref_labels >= 0).any() else
                 "; unlabelled, so FID is pooled only (per class needs ClassK/ folders or a labelled CSV)"))
        ref = (extract_features(ref_images, extractor, args.fid_batch_size, device), ref_labels)

    os.makedirs(args.out_dir, exist_ok=True)
    print(f"{PROG}: {args.n_per_class} images x {len(classes)} "
          f"{'class' if len(classes) == 1 else 'classes'} of {size}x{size}, sampler {args.sampler}, "
          f"seed {args.seed}, device {device}")
    all_images, all_labels = [], []
    start = time.perf_counter()
    for k in classes:
        name = UNCONDITIONAL_NAME if k is None else class_name(k)
        chunks = []
        n_chunks = math.ceil(args.n_per_class / batch_size)
        for chunk in range(n_chunks):
            n = min(batch_size, args.n_per_class - chunk * batch_size)
            labels = None if k is None else torch.full((n,), k, dtype=torch.long)
            bar = tqdm(total=size * size, desc=f"{name} batch {chunk + 1}/{n_chunks}", unit="px",
                       disable=True if args.no_progress else None, leave=False, dynamic_ncols=True)
            try:
                chunks.append(generate(model, labels, args.sampler,
                                       derive_seed(args.seed, -1 if k is None else k, chunk),
                                       n=n, progress=bar).cpu())
            finally:
                bar.close()
        images = torch.cat(chunks)
        grid_path, folder, stale = save_images(images, args.out_dir, name)
        note = f" (the folder also holds {stale} PNGs from an earlier, larger run)" if stale else ""
        print(f"{name}: wrote {grid_path} and {len(images)} images in {folder}{note}")
        all_images.append(images)
        all_labels += [-1 if k is None else k] * len(images)
    elapsed = time.perf_counter() - start
    total = sum(len(x) for x in all_images)
    print(f"{PROG}: {total} images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.2f} images/s)")

    if ref is not None:
        gen_feats = extract_features(torch.cat(all_images), extractor, args.fid_batch_size, device)
        dims = gen_feats.shape[1]  # args.fid_dims for Inception; whatever a stand-in extractor gives
        results, messages = compute_fid(gen_feats, all_labels, ref[0], ref[1], dims)
        for message in messages:
            print(message, file=sys.stderr)
        for name, r in results.items():
            print(f"FID {name}: {r['fid']:.3f} ({r['n_generated']} generated vs {r['n_reference']} "
                  f"reference images, {dims} dims)")
        summary = {"fid_dims": dims, "reference": args.fid_ref, "checkpoint": args.checkpoint,
                   "seed": args.seed, "sampler": args.sampler, "results": results, "warnings": messages}
        with open(os.path.join(args.out_dir, "fid.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def main(argv=None, extractor=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args, extractor)
    except (DataError, CheckpointError, UsageError, FIDWeightsError) as err:
        return report(PROG, err)


if __name__ == "__main__":
    reuse_freed_memory()  # faster on CPUs: see config
    sys.exit(main())
