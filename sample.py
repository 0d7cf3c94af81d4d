"""Draw images of each class from a conditional PixelCNN++, save them, and score them with FID.

    python sample.py --checkpoint C --out-dir samples/ [--n-per-class 25] [--classes 0,2]
                     [--batch-size N] [--seed S] [--device auto|cpu|cuda] [--sampler fast|naive]
                     [--fid-ref DIR] [--fid-ref-split train] [--fid-dims 2048] [--fid-weights PATH]

Writes <out-dir>/grid_ClassK.png (one grid per class) and <out-dir>/ClassK/0000.png, ... (single
8-bit PNGs), with the checkpoint's EMA weights. The same --seed (and --batch-size) gives the same
images: the images of class K, batch b come from a generator seeded with a number derived from
(--seed, K, b) alone, so they do not depend on which other classes are drawn.

--sampler fast (default) is the cached sampler of sampling.py; --sampler naive is the reference,
one full forward pass per pixel. Both draw the same random numbers in the same order.

--fid-ref DIR computes FID (fid.py: pytorch-fid's Inception features, --fid-dims of 64, 192, 768
or 2048) between the generated images and DIR, pooled over the drawn classes and per class. DIR can be
  - a folder with ClassK/ subfolders (for example another sample.py output): per class and pooled;
  - a CPEN455-layout root with <fid-ref-split>.csv (default train.csv): per class from its labels,
    pooled over the rows of the drawn classes (all rows when labels are unknown);
  - a plain folder of images: pooled only.
Reference images are resized to the model's image size, as for training, so that both sets have
the same resolution. With no more images in a set than feature dimensions, the covariance is
singular and FID is biased upward and unstable; the tool warns (the course's 192 dims on 100
images was such a case). pytorch-fid's Inception weights are downloaded on first use; offline, pass
--fid-weights PATH (the file pt_inception-2015-12-05-6726825d.pth), or put that file in
$TORCH_HOME/hub/checkpoints/.
"""
import json
import math
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import fid
from checkpoint import load_model
from config import ArgumentParser, UsageError, report, resolve_device, reuse_freed_memory
from dataset import class_name
from sampling import derive_seed, generate

PROG = "sample.py"
UNCONDITIONAL_NAME = "Unconditional"


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
    p.add_argument("--fid-dims", type=int, default=2048, choices=fid.FID_DIMS,
                   help="Inception feature dimensions (default 2048)")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="local pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--fid-batch-size", type=int, default=50, help="images per Inception pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None, extractor=None):
    """The CLI. `extractor` replaces pytorch-fid's Inception (tests pass a tiny network)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args, extractor)
    except UsageError as err:  # also DataError, CheckpointError and FIDWeightsError
        return report(PROG, err)


def run(args, extractor=None):
    check_args(args)
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, device)
    num_classes, size = model.config["num_classes"], model.config["image_size"]
    classes = parse_classes(args.classes, num_classes)

    # FID set-up first: a missing weights file or a bad reference folder should stop us before
    # minutes of sampling, not after.
    ref = None
    if args.fid_ref is not None:
        if extractor is None:
            extractor = fid.inception_extractor(args.fid_dims, args.fid_weights, device)
        ref = reference_features(args, extractor, device, num_classes, size, classes)

    os.makedirs(args.out_dir, exist_ok=True)
    print(f"{PROG}: {args.n_per_class} images x {len(classes)} "
          f"{'class' if len(classes) == 1 else 'classes'} of {size}x{size}, sampler {args.sampler}, "
          f"seed {args.seed}, device {device}")
    all_images, all_labels = [], []
    start = time.perf_counter()
    for k in classes:
        name = UNCONDITIONAL_NAME if k is None else class_name(k)
        images = draw_class(model, k, name, args)  # uint8 [n_per_class, 3, S, S]
        grid_path, folder, stale = save_images(images, args.out_dir, name)
        note = f" (the folder also holds {stale} PNGs from an earlier, larger run)" if stale else ""
        print(f"{name}: wrote {grid_path} and {len(images)} images in {folder}{note}")
        all_images.append(images)
        all_labels += [-1 if k is None else k] * len(images)
    elapsed = time.perf_counter() - start
    total = sum(len(x) for x in all_images)
    print(f"{PROG}: {total} images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.2f} images/s)")

    if ref is not None:
        gen_feats = fid.extract_features(torch.cat(all_images), extractor, args.fid_batch_size, device)
        score_fid(args, gen_feats, all_labels, *ref)
    return 0


def check_args(args):
    for option in ("n_per_class", "fid_batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir} exists and is not a folder")


def parse_classes(text, num_classes):
    """--classes -> class indices in the order given ([None] for an unconditional model)."""
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


def reference_features(args, extractor, device, num_classes, size, classes):
    """(features [N, D], labels [N], -1 for unknown) of the --fid-ref images."""
    images, labels = fid.reference_set(args.fid_ref, args.fid_ref_split, num_classes, size,
                                       None if num_classes == 0 else classes)
    print(f"FID reference: {len(images)} images from {args.fid_ref} (resized to {size}x{size})"
          + ("" if num_classes == 0 or (labels >= 0).any() else
             "; unlabelled, so FID is pooled only (per class needs ClassK/ folders or a labelled CSV)"))
    return fid.extract_features(images, extractor, args.fid_batch_size, device), labels


def draw_class(model, k, name, args):
    """--n-per-class uint8 images [N, 3, S, S] of class k (None: unconditional), in batches of
    --batch-size, batch b seeded by derive_seed(--seed, k, b)."""
    size = model.config["image_size"]
    batch_size = args.batch_size or args.n_per_class
    n_chunks = math.ceil(args.n_per_class / batch_size)
    chunks = []
    for chunk in range(n_chunks):
        n = min(batch_size, args.n_per_class - chunk * batch_size)
        labels = None if k is None else torch.full((n,), k, dtype=torch.long)
        bar = tqdm(total=size * size, desc=f"{name} batch {chunk + 1}/{n_chunks}", unit="px",
                   disable=True if args.no_progress else None, leave=False, dynamic_ncols=True)
        try:
            seed = derive_seed(args.seed, -1 if k is None else k, chunk)
            chunks.append(generate(model, labels, args.sampler, seed, n=n, progress=bar).cpu())
        finally:
            bar.close()
    return torch.cat(chunks)


def save_images(images, out_dir, name):
    """uint8 [N, 3, H, W] -> <out_dir>/grid_<name>.png and <out_dir>/<name>/0000.png, ...
    Returns (grid path, folder, how many older PNGs in the folder this run did not overwrite)."""
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


def score_fid(args, gen_feats, gen_labels, ref_feats, ref_labels):
    """Print FID pooled and per class, and write <out-dir>/fid.json."""
    dims = gen_feats.shape[1]  # args.fid_dims for Inception; whatever a stand-in extractor gives
    results, messages = fid.compute_fid(gen_feats, gen_labels, ref_feats, ref_labels, dims)
    for message in messages:
        print(message, file=sys.stderr)
    for name, r in results.items():
        print(f"FID {name}: {r['fid']:.3f} ({r['n_generated']} generated vs {r['n_reference']} "
              f"reference images, {dims} dims)")
    summary = {"fid_dims": dims, "reference": args.fid_ref, "checkpoint": args.checkpoint,
               "seed": args.seed, "sampler": args.sampler, "results": results, "warnings": messages}
    with open(os.path.join(args.out_dir, "fid.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    reuse_freed_memory()  # faster on CPUs: see config
    sys.exit(main())
