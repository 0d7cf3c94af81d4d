"""Does scoring several views of each image classify better? Accuracy of argmax_c of the mean
log p(x|c) over each set of views, on a labelled CSV.

    python bench/test_time_views.py --checkpoint runs/r45/last.pt --data-dir ../shared/data/cpen455 \
        --csv runs/r45/splits/val.csv [--batch-size 64]

The views: the image as given ("id"), its mirror image ("flip"), and its translations by one and
by two pixels up, down, left and right ("shift1", "shift2"), edges reflected as `train.py --shift`
draws them. Every view is scored under every label once (classify.score_images); each view set's
accuracy is then the mean of its views' log-likelihoods, as `classify.py --hflip` takes for
"id+flip". The rows are printed, not chosen: choose on one split and report on another.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_model  # noqa: E402
from classify import score_images  # noqa: E402
from config import ArgumentParser, UsageError, report, speed_up_cpu  # noqa: E402
from dataset import item_paths, load_images, read_split_csv  # noqa: E402

PROG = "test_time_views.py"
SHIFTS = {d: [(d, 0), (-d, 0), (0, d), (0, -d)] for d in (1, 2)}
VIEW_SETS = {"id": ["id"], "id+flip": ["id", "flip"],
             "id+shift1": ["id", *SHIFTS[1]], "id+shift2": ["id", *SHIFTS[2]],
             "id+flip+shift1": ["id", "flip", *SHIFTS[1]],
             "id+shift1+shift2": ["id", *SHIFTS[1], *SHIFTS[2]],
             "all": ["id", "flip", *SHIFTS[1], *SHIFTS[2]]}


def translate(images, dy, dx, margin=2):
    """uint8 [N, 3, S, S] -> the same images moved by (dy, dx) pixels, edges reflected."""
    size = images.shape[-1]
    padded = F.pad(images.float(), [margin] * 4, mode="reflect")  # [N, 3, S + 2m, S + 2m]
    window = padded[:, :, margin - dy:margin - dy + size, margin - dx:margin - dx + size]
    return window.to(torch.uint8)  # exact: reflection copies the images' own levels


def view(images, name):
    if name == "id":
        return images
    if name == "flip":
        return images.flip(-1)
    return translate(images, *name)


def main():
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    speed_up_cpu()
    device = torch.device("cpu")
    try:
        model, _ = load_model(args.checkpoint, device)
        K, size = model.config["num_classes"], model.config["image_size"]
        items = read_split_csv(args.data_dir, args.csv, num_classes=K, allow_unknown=False)
        images = load_images(item_paths(args.data_dir, args.csv, items), size)
    except UsageError as err:  # also CheckpointError and DataError
        return report(PROG, err)
    labels = np.array([label for _, label in items])
    names = sorted({v for views in VIEW_SETS.values() for v in views}, key=str)
    loglik = {name: score_images(model, view(images, name), K, args.batch_size, device)[0]
              for name in names}  # each [N, K]
    print(f"{args.checkpoint} on {args.csv} ({len(labels)} images)")
    for set_name, views in VIEW_SETS.items():
        right = int((np.mean([loglik[v] for v in views], axis=0).argmax(1) == labels).sum())
        print(f"  {set_name:18s} {right}/{len(labels)} ({right / len(labels):.1%})")


if __name__ == "__main__":
    sys.exit(main())
