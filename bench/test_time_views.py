"""Does scoring several views of each image classify better? Accuracy of argmax_c of the mean
log p(x|c) over each set of views, on a labelled CSV.

    python bench/test_time_views.py --checkpoint runs/r45/last.pt --data-dir ../shared/data/cpen455 \
        --csv runs/r45/splits/val.csv [--batch-size 64]

The views: the image as given ("id"), its mirror image ("flip"), and its translations by one and
by two pixels up, down, left and right ("shift1", "shift2"), edges reflected as `train.py --shift`
draws them. Every view is scored under every label once (classify.score_images); each view set's
accuracy is then the mean of its views' log-likelihoods, as `classify.py --hflip` takes for
"id+flip". The rows are printed, not chosen: choose on one split and report on another.

--dropout-masks M also scores the image under M dropout masks of the network (its training
dropout, off when classify.py scores), the same mask for every label of an image, so that each
mask is one sub-network's p(x|c). Its rows combine the masks' log-likelihoods by their mean (a
product of the sub-networks) and by log-mean-exp (their mixture).
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_model  # noqa: E402
from classify import score_images  # noqa: E402
from config import ArgumentParser, UsageError, report, speed_up_cpu  # noqa: E402
from dataset import item_paths, load_images, read_split_csv, to_model_input  # noqa: E402
from utils import discretized_mix_logistic_log_probs  # noqa: E402

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


@torch.no_grad()
def score_under_masks(model, images, num_classes, masks, batch_size, device, seed=0):
    """log p(x|c) in nats of uint8 images [N, 3, S, S] under `masks` dropout masks -> [masks, N, K]
    float64. Each (mask, batch) reseeds the global generator before every label's pass, so that
    an image sees the same mask under every label."""
    out = np.empty((masks, len(images), num_classes), dtype=np.float64)
    model.train()  # dropout on; the model has no other training-only behaviour
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=f"{masks} dropout masks", leave=False,
                          disable=None):  # on a terminal only, as classify.py's bar
            x = to_model_input(images[start:start + batch_size]).to(device)
            for mask in range(masks):
                for label in range(num_classes):
                    torch.manual_seed(int(np.random.SeedSequence([seed, mask, start]).generate_state(1)[0]))
                    labels = torch.full((len(x),), label, device=device)
                    log_probs = discretized_mix_logistic_log_probs(x, model(x, labels))  # [b, S, S]
                    out[mask, start:start + len(x), label] = log_probs.double().sum(dim=(1, 2)).cpu().numpy()
    finally:
        model.eval()
    return out


def print_accuracy(name, log_likelihoods, labels):
    right = int((log_likelihoods.argmax(1) == labels).sum())
    print(f"  {name:18s} {right}/{len(labels)} ({right / len(labels):.1%})")


def main():
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dropout-masks", type=int, default=0, metavar="M",
                        help="also score under M dropout masks of the network (default 0: none)")
    args = parser.parse_args()
    if args.dropout_masks < 0:
        parser.error(f"--dropout-masks must be at least 0, got {args.dropout_masks}")
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
        print_accuracy(set_name, np.mean([loglik[v] for v in views], axis=0), labels)
    if args.dropout_masks:
        masked = score_under_masks(model, images, K, args.dropout_masks, args.batch_size, device)
        print_accuracy("one mask", masked[0], labels)
        print_accuracy("masks (mean)", masked.mean(0), labels)
        mixture = np.logaddexp.reduce(masked, axis=0) - np.log(args.dropout_masks)
        print_accuracy("masks (mixture)", mixture, labels)


if __name__ == "__main__":
    sys.exit(main())
