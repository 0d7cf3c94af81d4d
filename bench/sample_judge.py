"""Judge generated samples with a small discriminative CNN: a sample-quality figure that needs no
Inception weights (the "GAN-test" accuracy of Shmelkov et al., 2018).

    python bench/sample_judge.py --samples runs/judge/samples [--data-dir ../shared/data/cpen455]
                                 [--epochs 60] [--seed 0] [--threads N] [--save-judge judge.pt]
                                 [--judge judge.pt] [--out result.json] [--no-progress]

It trains the judge (six 3x3 convs with BatchNorm and ReLU, 288k parameters, Adam with a cosine
decay, random mirroring and shifts) on CPEN455's labelled training images at 32x32, except the
project's validation split (10% of train.csv, stratified, seed 0, as train.py carves it), which
it never sees. It prints its accuracy on that split, overall and per class, then the share of
each <samples>/ClassK/ folder (sample.py's layout) that it labels as class K, and the overall
share, beside it (where sample.py's samples.json is, only the images of the run it records);
then the Frechet distance from the samples to the validation images in the judge's pooled
features, beside that of as many random training images (the floor). --judge PATH reuses a judge
saved with --save-judge (a plain state_dict) and trains nothing. The same --seed and --threads
give the same judge on a CPU.

The share says whether a sample shows its class to a classifier that is good on real images; it
says nothing about diversity (one perfect image repeated would score 100%). The Frechet distance
compares the spread of the samples with that of real images, but in features learned to tell the
classes apart, so it is a partial check on diversity and not FID. Over no more images than those
128 features (25 samples per class) the covariances are singular and the distance is biased upward:
it says so, and then only the floor over as many images compares with it. Real FID
(sample.py --fid-ref, with pytorch-fid's Inception weights) remains the reference where the
weights exist.
"""
import json
import os
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402  (the repository root is on the path only now)
from checkpoint import atomic_write  # noqa: E402
from config import (ArgumentParser, UsageError, check_distinct, check_output, first_line, report,  # noqa: E402
                    speed_up_cpu)
from dataset import (SAMPLES_RECORD, class_name, item_paths, load_images, read_class_folders,  # noqa: E402
                     read_split_csv, split_csv_path, split_train_val, to_model_input)

PROG = "sample_judge.py"
NUM_CLASSES, IMAGE_SIZE = 4, 32
VAL_FRACTION, VAL_SEED = 0.1, 0  # train.py's split of CPEN455 (README, "Shipped checkpoints")
WIDTHS = (32, 64, 128)  # channels at 32x32, 16x16 and 8x8
BATCH_SIZE, LR, WEIGHT_DECAY = 64, 2e-3, 5e-4
SHIFT = 4  # the largest random translation, in pixels


def build_parser():
    p = ArgumentParser(prog=PROG, description="Train a small CNN on CPEN455 (never on the validation "
                       "split) and report the share of each class's samples that it labels as that class.")
    p.add_argument("--data-dir", default="../shared/data/cpen455", help="a CPEN455-layout root with train.csv")
    p.add_argument("--samples", default=None, metavar="DIR",
                   help="sample.py's --out-dir: DIR/ClassK/*.png (without it, only the judge is scored)")
    p.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    p.add_argument("--seed", type=int, default=0, help="weights, batch order and augmentation (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--save-judge", default=None, metavar="PATH", help="save the trained judge's state_dict")
    p.add_argument("--judge", default=None, metavar="PATH", help="reuse a saved judge instead of training one")
    p.add_argument("--out", default=None, metavar="PATH", help="write the figures as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:  # also DataError
        return report(PROG, err)


def run(args):
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = read_samples(args.samples) if args.samples else None  # fail before minutes of training
    judge = load_judge(args.judge) if args.judge else None
    (train_images, train_labels), (val_images, val_labels) = read_cpen455(args.data_dir, not args.no_progress)
    print(f"{PROG}: {len(train_labels)} training images, {len(val_labels)} validation images "
          f"({VAL_FRACTION:g} of train.csv, seed {VAL_SEED})")

    if judge is None:
        start = time.perf_counter()
        judge = train_judge(train_images, train_labels, args.epochs, args.seed, args.no_progress)
        print(f"{PROG}: trained for {args.epochs} epochs in {time.perf_counter() - start:.0f} s "
              f"on {torch.get_num_threads()} threads")
        if args.save_judge:
            atomic_write(args.save_judge, lambda f: torch.save(judge.state_dict(), f))

    result = {"data_dir": args.data_dir, "judge": args.judge, "epochs": None if args.judge else args.epochs,
              "seed": args.seed, "parameters": sum(p.numel() for p in judge.parameters()),
              "validation": judge_set(judge, val_images, val_labels)}
    if samples is not None:
        images, labels, record = samples
        print(describe_samples(args.samples, labels, record))
        result["samples_dir"], result["sampled_by"] = args.samples, record
        result["samples"] = judge_set(judge, images, labels)
        if len(labels) >= 2:  # a Frechet distance needs two images to have a covariance
            result["frechet"] = frechet_to_validation(judge, images, train_images, val_images, args.seed)
    print_table(result)
    if args.out:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.out, lambda f: f.write(text.encode()))
    return 0


def check_args(args):
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.judge and args.save_judge:
        raise UsageError("--judge reuses a saved judge and trains nothing; drop --save-judge")
    if args.judge and not os.path.isfile(args.judge):
        raise UsageError(f"--judge: file not found: {args.judge}")
    if args.samples and not os.path.isdir(args.samples):
        raise UsageError(f"--samples: folder not found: {args.samples}")
    outputs = [("--save-judge", args.save_judge), ("--out", args.out)]
    for option, path in outputs:
        if path:
            check_output(option, path)  # now, not after minutes of training
    check_distinct(outputs, [("--judge", args.judge)])


def read_cpen455(root, progress=True):
    """train.csv -> ((uint8 images [N, 3, 32, 32], labels [N]) for training, the same for the
    validation split that train.py carves and never trains on)."""
    csv_path = split_csv_path(root, "train")
    items = read_split_csv(root, csv_path, NUM_CLASSES, allow_unknown=False)
    parts = split_train_val(items, VAL_FRACTION, VAL_SEED)  # (training items, validation items)
    return [(load_images(item_paths(root, csv_path, part), IMAGE_SIZE, None if progress else False),
             torch.tensor([label for _, label in part])) for part in parts]


def read_samples(folder):
    """sample.py's <folder>/ClassK/*.png -> (uint8 images [N, 3, 32, 32], labels [N], sample.py's
    record or None). The images its samples.json lists; without one, every image of every ClassK/
    folder that exists (sample.py --classes draws a subset); an empty one is an error."""
    class_folders, record = read_class_folders(folder, NUM_CLASSES)
    if record is not None and not class_folders:
        raise UsageError(f"--samples {folder}: its {SAMPLES_RECORD} records an unconditional model's "
                         f"samples, which have no class to judge")
    if not class_folders:
        raise UsageError(f"--samples {folder}: no {class_name(0)}/ .. {class_name(NUM_CLASSES - 1)}/ "
                         f"folders (the layout of sample.py --out-dir)")
    images = torch.cat([load_images(paths, IMAGE_SIZE) for _, paths in class_folders])
    labels = torch.tensor([k for k, paths in class_folders for _ in paths])
    return images, labels, record


def describe_samples(folder, labels, record):
    """One line: which images are judged, and by whose record."""
    if record is None:
        return (f"{PROG}: {len(labels)} samples, every image of the ClassK/ folders of {folder} "
                f"(no {SAMPLES_RECORD}: not written by sample.py, or by one stopped halfway)")
    guided = f", guidance {record['guidance']}" if record.get("guidance") else ""
    return (f"{PROG}: {len(labels)} samples, the {record['n_per_class']} per class that "
            f"{os.path.join(folder, SAMPLES_RECORD)} lists (checkpoint {record.get('checkpoint')}, "
            f"seed {record.get('seed')}{guided})")


# --------------------------------------------------------------------------------------------
# The judge

def build_judge():
    """Two conv-BN-ReLU layers per resolution (32, 16, 8), max-pooling between, global average
    pooling and a linear layer: [B, 3, 32, 32] in [-1, 1] -> logits [B, NUM_CLASSES]."""
    layers, channels = [], 3
    for i, width in enumerate(WIDTHS):
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)]
    return nn.Sequential(*layers)


def load_judge(path):
    judge = build_judge()
    try:
        judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # torch raises many types for foreign or corrupt files
        raise UsageError(f"--judge {path}: not a judge saved by --save-judge ({first_line(err)})") from None
    return judge


def augment(x, generator):
    """Mirror each image of [B, 3, H, W] left-right with probability 1/2 and shift it by up to
    SHIFT pixels each way (edge pixels repeated): small changes that keep the class."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = nn.functional.pad(x, (SHIFT,) * 4, mode="replicate")  # [B, 3, H + 2S, W + 2S]
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


def train_judge(images, labels, epochs, seed, no_progress):
    """uint8 images [N, 3, 32, 32], labels [N] -> the trained judge, in eval mode."""
    torch.manual_seed(seed)  # the weights' initialisation
    generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
    judge = build_judge()
    x_all = to_model_input(images)  # [N, 3, 32, 32] in [-1, 1]
    steps_per_epoch = -(-len(x_all) // BATCH_SIZE)
    optimizer = torch.optim.Adam(judge.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="training the judge", unit="step",
               disable=True if no_progress else None, dynamic_ncols=True)
    judge.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for batch in order.split(BATCH_SIZE):
            loss = nn.functional.cross_entropy(judge(augment(x_all[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return judge.eval()


@torch.no_grad()
def judge_set(judge, images, labels):
    """How the judge labels uint8 images [N, 3, 32, 32] of known labels [N]: overall and per class
    the share labelled as their own class, and per class how many went to each label."""
    judge.eval()
    predicted = torch.cat([judge(to_model_input(chunk)).argmax(1) for chunk in images.split(256)])  # [N]
    per_class = {}
    for k in labels.unique().tolist():
        mine = predicted[labels == k]
        per_class[class_name(k)] = {"correct": int((mine == k).sum()), "n": len(mine),
                                    "share": int((mine == k).sum()) / len(mine),
                                    "labelled_as": torch.bincount(mine, minlength=NUM_CLASSES).tolist()}
    correct = int((predicted == labels).sum())
    return {"correct": correct, "n": len(labels), "share": correct / len(labels), "per_class": per_class}


def frechet_to_validation(judge, sample_images, train_images, val_images, seed):
    """The Frechet distance, in the judge's pooled features, from the samples to the validation
    images, beside that from as many random training images: the floor that real images reach."""
    n = min(len(sample_images), len(train_images))
    real = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]]
    val = judge_features(judge, val_images)
    return {"samples": fid.fid_from_features(judge_features(judge, sample_images), val),
            "training_images": fid.fid_from_features(judge_features(judge, real), val), "n": n}


@torch.no_grad()
def judge_features(judge, images):
    """uint8 images [N, 3, 32, 32] -> the judge's pooled features [N, WIDTHS[-1]], before its linear layer."""
    judge.eval()
    return torch.cat([judge[:-1](to_model_input(chunk)) for chunk in images.split(256)]).numpy()


def print_table(result):
    """A Markdown table: per class, the judge on real validation images and on the samples."""
    val, samples = result["validation"], result.get("samples")
    print("| class | judge on real validation images | samples judged as their class |")
    print("|---|---|---|")
    rows = [(name, val["per_class"][name]) for name in val["per_class"]] + [("all", val)]
    for name, real in rows:
        generated = samples if name == "all" else (samples or {}).get("per_class", {}).get(name)
        print(f"| {name} | {fraction(real)} | {fraction(generated) if generated else '-'} |")
    if "frechet" in result:
        f = result["frechet"]
        print(f"Frechet distance to the validation images in the judge's {WIDTHS[-1]} features: samples "
              f"{f['samples']:.2f}, {f['n']} random training images {f['training_images']:.2f} (the floor)")
        if f["n"] <= WIDTHS[-1]:  # as fid.compute_fid warns: a singular covariance biases the distance upward
            print(f"note: {f['n']} images, no more than the {WIDTHS[-1]} features: their covariance is singular, "
                  f"so compare the samples' distance only with the floor's, over as many images")


def fraction(r):
    return f"{100 * r['share']:.1f}% ({r['correct']}/{r['n']})"


if __name__ == "__main__":
    speed_up_cpu()  # as train.py does: faster on CPUs, see config
    sys.exit(main())
