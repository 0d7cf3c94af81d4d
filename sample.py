"""Draw images of each class from a conditional PixelCNN++, save them, and score them with FID.

    python sample.py --checkpoint C --out-dir samples/ [--n-per-class 25] [--classes 0,2]
                     [--batch-size N] [--seed S] [--device auto|cpu|cuda] [--sampler fast|naive]
                     [--guidance W]
                     [--fid-ref DIR] [--fid-ref-split train] [--fid-dims 2048] [--fid-weights PATH]
    python sample.py --checkpoint C --out-dir completions/ --complete DIR [--keep-rows R] ...
    torchrun --nproc_per_node=N sample.py ...

Writes <out-dir>/grid_ClassK.png (one grid per class), <out-dir>/ClassK/0000.png, ... (single
8-bit PNGs), with the checkpoint's EMA weights, and <out-dir>/samples.json, the record of the run
(checkpoint, classes, images per class, seed, batch size, sampler, guidance): a folder's readers
(bench/sample_judge.py, --fid-ref) take only the images it lists, not older ones a larger run
left. The same --seed (and --batch-size) gives the same images: the images of class K, batch b
come from a generator seeded with a number derived from (--seed, K, b) alone, so they do not
depend on which other classes are drawn.

--complete DIR keeps the top --keep-rows rows (default: half) of each image in DIR (read
recursively, resized to the model's image size) and samples the rest under each label, or under
--classes, --n-per-class times (default 1). It writes <out-dir>/completions/<image>.png, one row per
completion: the original, the kept rows (the rest grey), then one completion per label (the
original and the kept rows in the first row only); and <out-dir>/grid_completions.png, those rows
of every image. The kept rows come back unchanged. A batch holds completions of one label (default:
all of them; --batch-size N splits them), seeded as above.

Under torchrun (nccl on GPUs, gloo on CPUs), the batches are shared out between the processes
and rank 0 writes every file: the files are those of one process with the same --seed and
--batch-size. Only rank 0 prints; FID is computed once, on rank 0. The work is split by batch, so
to spread one class's images over several processes, pass a --batch-size below --n-per-class.

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
import sys
import time
from typing import NamedTuple

import torch
from PIL import Image
from tqdm import tqdm

import fid
from checkpoint import atomic_write, load_model
from config import (EXIT_USER_ERROR, ArgumentParser, UsageError, check_output, first_error, gather_on_main,
                    join_processes, leave_processes, report, run_cli, speed_up_cpu)
from dataset import (SAMPLES_RECORD, DataError, class_name, image_path, list_image_folder, load_images,
                     sample_file_name, sample_index)
from sampling import derive_seed, generate

PROG = "sample.py"
UNCONDITIONAL_NAME = "Unconditional"
GREY = 128  # what replaces the rows that completion samples, in the grids' "kept" column
FID_FILE = "fid.json"  # in --out-dir, with --fid-ref


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
    p.add_argument("--n-per-class", type=int, default=None, metavar="N",
                   help="images per class (default 25); with --complete, completions per image and label (default 1)")
    p.add_argument("--classes", default=None, help="comma-separated class indices (default: all)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per sampling batch (default: --n-per-class, or with --complete all of "
                   "a label's completions); part of what --seed fixes")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--guidance", type=float, default=0.0, metavar="W",
                   help="sharpen each pixel's distribution for its label against the label-averaged "
                        "one by weight W (default 0: the model's own p(x|c); costs K times the work)")
    p.add_argument("--sampler", choices=("fast", "naive"), default="fast",
                   help="fast: cached incremental sampler (default); naive: one forward pass per pixel")
    p.add_argument("--complete", default=None, metavar="DIR",
                   help="complete the images in DIR below their top --keep-rows rows, under every label")
    p.add_argument("--keep-rows", type=int, default=None, metavar="R",
                   help="with --complete: rows kept from the top (default: half the image)")
    p.add_argument("--fid-ref", default=None, metavar="DIR", help="compute FID against the images in DIR (see below)")
    p.add_argument("--fid-ref-split", default="train",
                   help="for a CPEN455-layout --fid-ref: which <split>.csv (default train)")
    p.add_argument("--fid-dims", type=int, default=2048, choices=fid.FID_DIMS,
                   help="Inception feature dimensions (default 2048)")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="local pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--fid-batch-size", type=int, default=50, help="images per Inception pass (default 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None, extractor=None):
    """The CLI. `extractor` replaces pytorch-fid's Inception (tests pass a tiny network)."""
    args = build_parser().parse_args(argv)
    code, together = EXIT_USER_ERROR, False
    try:
        code = run(args, extractor)
        together = True
    except UsageError as err:  # also DataError, CheckpointError and FIDWeightsError
        code = report(PROG, err) if os.environ.get("RANK", "0") == "0" else EXIT_USER_ERROR
        together = isinstance(err, SharedError)
    finally:
        leave_processes(succeeded=together)
    return code


class SharedError(UsageError):
    """An error that every process raises at the same point (first_error): under torchrun, rank 0
    says it, and the processes leave together, so that none is stopped before rank 0 has spoken."""


class Job(NamedTuple):
    """What a run draws: the model, the classes, and for completion the given images."""
    model: torch.nn.Module
    classes: list            # class indices, or [None] for an unconditional model
    n_per_class: int         # images per class, or completions per image and label
    given: torch.Tensor      # --complete: uint8 [N, 3, S, S]; None otherwise
    ids: list                # --complete: the images' ids in their folder
    keep_rows: int           # --complete: rows kept from the top; 0 otherwise


class Batch(NamedTuple):
    """Items lo..hi-1 of class k (item t of a completion: image t // n_per_class), batch number
    `chunk` of the class, seeded by derive_seed(--seed, k, chunk)."""
    k: object  # a class index, or None (unconditional)
    chunk: int
    lo: int
    hi: int


def run(args, extractor=None):
    rank, world_size, device = join_processes(args.device)
    is_main = rank == 0
    job = ref = error = None
    try:
        job = prepare(args, device)
        check_planned_outputs(job, args)
        # FID set-up first: a missing weights file or a bad reference folder should stop us
        # before minutes of sampling, not after. Features are needed once, on rank 0.
        if is_main and args.fid_ref is not None:
            if extractor is None:
                extractor = fid.inception_extractor(args.fid_dims, args.fid_weights, device)
            ref = reference_features(args, extractor, device, job.model.config["num_classes"],
                                     job.model.config["image_size"], job.classes)
    except UsageError as err:
        error = str(err)
    error = first_error(error)
    if error is not None:
        raise SharedError(error)

    batches = plan_batches(job, args.batch_size)
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        print(describe(args, job, device, world_size))
    start = time.perf_counter()
    mine = {b: draw_batch(job, b, args, progress=is_main) for b in batches[rank::world_size]}
    shares = gather_on_main(mine)  # {Batch: images} of every rank, on rank 0
    drawn = None if shares is None else {batch: x for share in shares for batch, x in share.items()}
    if not is_main:
        return 0
    per_class = {k: torch.cat([drawn[b] for b in batches if b.k == k]) for k in job.classes}
    elapsed = time.perf_counter() - start
    total = sum(len(x) for x in per_class.values())
    if job.given is None:
        save_samples(args, job, per_class)
    else:
        save_completions(job, per_class, args.out_dir)
    print(f"{PROG}: {total} images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.2f} images/s)")

    if ref is not None:
        all_images = torch.cat(list(per_class.values()))
        all_labels = [-1 if k is None else k for k, x in per_class.items() for _ in x]
        gen_feats = fid.extract_features(all_images, extractor, args.fid_batch_size, device)
        score_fid(args, gen_feats, all_labels, *ref)
    return 0


def prepare(args, device):
    """Check the command line, load the model and any images to complete -> Job."""
    check_args(args)
    model, _ = load_model(args.checkpoint, device)
    classes = parse_classes(args.classes, model.config["num_classes"])
    if args.guidance and model.config["num_classes"] < 2:
        raise UsageError(f"--guidance needs a model conditioned on two or more labels; {args.checkpoint} has "
                         f"{model.config['num_classes']}")
    if args.complete is None:
        return Job(model, classes, args.n_per_class or 25, None, [], 0)
    size = model.config["image_size"]
    keep_rows = size // 2 if args.keep_rows is None else args.keep_rows
    if not 1 <= keep_rows <= size - 1:
        raise UsageError(f"--keep-rows {keep_rows}: the model's images have {size} rows, so keep 1..{size - 1}")
    ids = [item_id for item_id, _ in list_image_folder(args.complete)]
    paths = [image_path(args.complete, None, item_id) for item_id in ids]
    given = load_images(paths, size)  # uint8 [N, 3, S, S]
    for path in paths:  # the model's images are square: another shape would be stretched
        with Image.open(path) as image:
            width, height = image.size
        if width != height:
            raise DataError(f"{path}: {width}x{height}; completion takes square images "
                            f"(resized to the model's {size}x{size})")
    stems = [os.path.splitext(item_id)[0] for item_id in ids]
    if len(set(stems)) < len(stems):
        raise DataError(f"{args.complete}: two images differ only by their extension, so their grids "
                        f"would share a name")
    return Job(model, classes, args.n_per_class or 1, given, ids, keep_rows)


def check_planned_outputs(job, args):
    """UsageError now, not after the sampling, where a file this run writes cannot be written (a
    folder in its place, or a file in place of its folder); and for --out-dir inside --complete's
    folder, whose images the completions would join."""
    out = args.out_dir
    if job.given is not None:
        images = os.path.realpath(args.complete)
        if os.path.commonpath([images, os.path.realpath(out)]) == images:
            raise UsageError(f"--out-dir {out} is inside --complete {args.complete}: its completions would "
                             f"join the images; give a folder outside it")
        files = [completion_file(out, item_id) for item_id in job.ids] + [grid_file(out, "completions")]
    else:
        names = [label_name(k) for k in job.classes]
        files = [grid_file(out, name) for name in names]
        files += [os.path.join(out, name, sample_file_name(i)) for name in names for i in range(job.n_per_class)]
        files.append(os.path.join(out, SAMPLES_RECORD))
    if args.fid_ref is not None:
        files.append(os.path.join(out, FID_FILE))
    for path in files:
        check_output("--out-dir", path)


def check_args(args):
    for option in ("n_per_class", "batch_size", "fid_batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not 0 <= args.guidance < math.inf:
        raise UsageError(f"--guidance must be a number >= 0, got {args.guidance}")
    check_output("--out-dir", args.out_dir, folder=True)
    if args.complete is None and args.keep_rows is not None:
        raise UsageError("--keep-rows goes with --complete DIR")
    if args.complete is not None and args.fid_ref is not None:
        raise UsageError("--fid-ref scores drawn images, not completions: drop it or --complete")


def describe(args, job, device, world_size):
    size = job.model.config["image_size"]
    what = (f"{job.n_per_class} images x {len(job.classes)} "
            f"{'class' if len(job.classes) == 1 else 'classes'} of {size}x{size}")
    if job.given is not None:
        what = (f"completing {len(job.given)} images below row {job.keep_rows} of {size}, "
                f"{job.n_per_class} per label x {len(job.classes)} labels")
    processes = f", {world_size} processes" if world_size > 1 else ""
    guided = f", guidance {args.guidance:g}" if args.guidance else ""
    return f"{PROG}: {what}, sampler {args.sampler}, seed {args.seed}{guided}, device {device}{processes}"


def label_name(k):
    return UNCONDITIONAL_NAME if k is None else class_name(k)


def plan_batches(job, batch_size):
    """Every sampling batch of the run, class by class, in order."""
    n_items = job.n_per_class * (1 if job.given is None else len(job.given))
    batch_size = batch_size or n_items
    return [Batch(k, chunk, lo, min(lo + batch_size, n_items))
            for k in job.classes for chunk, lo in enumerate(range(0, n_items, batch_size))]


def draw_batch(job, batch, args, progress):
    """One batch's uint8 images [hi - lo, 3, S, S], on the CPU."""
    size, n = job.model.config["image_size"], batch.hi - batch.lo
    name = label_name(batch.k)
    labels = None if batch.k is None else torch.full((n,), batch.k, dtype=torch.long)
    given = None
    if job.given is not None:  # item t completes image t // n_per_class
        given = job.given[torch.arange(batch.lo, batch.hi) // job.n_per_class]
    bar = tqdm(total=(size - job.keep_rows) * size, desc=f"{name} batch {batch.chunk + 1}", unit="px",
               disable=True if args.no_progress or not progress else None, leave=False, dynamic_ncols=True)
    try:
        seed = derive_seed(args.seed, -1 if batch.k is None else batch.k, batch.chunk)
        return generate(job.model, labels, args.sampler, seed, n=n, progress=bar, given=given,
                        keep_rows=job.keep_rows, guidance=args.guidance).cpu()
    finally:
        bar.close()


def save_samples(args, job, per_class):
    """Each class's grid and single PNGs (save_images), said class by class, then the run's record.
    An earlier run's record goes first: a run stopped halfway leaves none, not one that lists
    images of two runs."""
    record_path = os.path.join(args.out_dir, SAMPLES_RECORD)
    if os.path.isfile(record_path):
        os.remove(record_path)
    for k, images in per_class.items():
        name = label_name(k)
        grid_path, folder, stale = save_images(images, args.out_dir, name)
        note = (f" (the folder also holds {stale} PNGs from an earlier, larger run, which {SAMPLES_RECORD} "
                f"leaves out)") if stale else ""
        print(f"{name}: wrote {grid_path} and {len(images)} images in {folder}{note}")
    record = {"checkpoint": args.checkpoint, "classes": job.classes, "n_per_class": job.n_per_class,
              "seed": args.seed, "batch_size": args.batch_size, "sampler": args.sampler,
              "guidance": args.guidance}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(record_path, lambda f: f.write(text.encode()))
    fid_path = os.path.join(args.out_dir, FID_FILE)
    if args.fid_ref is None and os.path.isfile(fid_path):  # kept: its scores may be all that is left of them
        print(f"note: {fid_path} scores an earlier run's images, not these (its checkpoint and seed say which)")


def save_completions(job, per_class, out_dir):
    """<out_dir>/completions/<image>.png and <out_dir>/grid_completions.png. A row per completion:
    the original, the kept rows, one completion per label; the first two cells in the first row only."""
    import torchvision
    n, columns = job.n_per_class, 2 + len(job.classes)
    kept = job.given.clone()
    kept[:, :, job.keep_rows:] = GREY
    # [N, n, 2 + K, 3, S, S]: a row of cells per completion, black where a cell is left empty
    cells = torch.zeros(len(job.given), n, columns, *job.given.shape[1:], dtype=torch.uint8)
    cells[:, 0, 0], cells[:, 0, 1] = job.given, kept
    for column, images in enumerate(per_class.values(), start=2):
        cells[:, :, column] = images.view(len(job.given), n, *images.shape[1:])

    def save(rows, path):  # rows: [R, 2 + K, 3, S, S]
        torchvision.utils.save_image(rows.flatten(0, 1).float() / 255.0, path, nrow=columns, padding=2)

    for item_id, rows in zip(job.ids, cells):
        path = completion_file(out_dir, item_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save(rows, path)
    grid = grid_file(out_dir, "completions")
    save(cells.flatten(0, 1), grid)
    print(f"wrote {len(job.ids)} grids in {os.path.join(out_dir, 'completions')} and {grid} "
          "(columns: original, kept rows, " + ", ".join(label_name(k) for k in job.classes) + ")")


def grid_file(out_dir, name):
    """<out_dir>/grid_<name>.png: a class's samples, or every completion (name "completions")."""
    return os.path.join(out_dir, f"grid_{name}.png")


def completion_file(out_dir, item_id):
    """<out_dir>/completions/<image>.png: the completions of the image `item_id` of --complete."""
    return os.path.join(out_dir, "completions", os.path.splitext(item_id)[0] + ".png")


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


def save_images(images, out_dir, name):
    """uint8 [N, 3, H, W] -> <out_dir>/grid_<name>.png and <out_dir>/<name>/0000.png, ...
    Returns (grid path, folder, how many older PNGs in the folder this run did not overwrite)."""
    import torchvision
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    images = images.cpu()
    for index, image in enumerate(images):  # 8-bit RGB PNGs (torchvision.io's PNG writer is deprecated)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, sample_file_name(index)))
    nrow = max(1, math.ceil(math.sqrt(len(images))))
    grid_path = grid_file(out_dir, name)
    torchvision.utils.save_image(images.float() / 255.0, grid_path, nrow=nrow, padding=2)
    indices = [sample_index(f) for f in os.listdir(folder)]
    return grid_path, folder, sum(1 for i in indices if i is not None and i >= len(images))


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
    text = json.dumps(summary, indent=2)
    atomic_write(os.path.join(args.out_dir, FID_FILE), lambda f: f.write(text.encode()))


if __name__ == "__main__":
    speed_up_cpu()  # faster on CPUs: see config
    run_cli(main)
