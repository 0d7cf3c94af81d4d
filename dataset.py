"""Data: readers for the CPEN455 layout and for plain image folders, the transform to model input,
and the generator of the procedural demo data set.

Items are `(id, label)` pairs: `id` is the image's name exactly as its CSV (or folder) lists it,
`label` an int, -1 meaning unknown. Files are found with `image_path`.

API
---
DataError(config.UsageError)             one line that names the file (and CSV row) at fault
class_name(k) -> str                      "Class{k}"
IMAGE_EXTENSIONS                          (".jpg", ".jpeg", ".png", ".bmp", ".webp"), any case
split_csv_path(root, split) -> str        root/<split>.csv
parse_split_csv(csv_path, num_classes=None, allow_unknown=True) -> list[(id, label)]  the rows of
    a split CSV, labels checked (as read_split_csv) but files not looked for
read_split_csv(root, csv_path, num_classes=None, allow_unknown=True) -> list[(id, label)]
    CSV rows "id,label": no header or a header "id,label", CRLF or LF, ids such as
    "train/0000001.jpg" (relative to root) or bare names "0000001.jpg" (relative to
    root/<split>/ for root/<split>.csv). Extra columns after the label are ignored. Raises
    DataError for a missing root or CSV, a malformed row, a label outside -1..num_classes-1
    (or -1 when allow_unknown is False), a listed file that does not exist, or classify.py's output
    (a header with posterior_ columns: its labels are predictions).
image_path(root, csv_path, item_id) -> str  the file of a CSV item (csv_path None: a folder item)
item_paths(root, csv_path, items) -> list[str]
list_image_folder(folder) -> list[(id, -1)]  every image under folder, recursively, sorted; ids
    relative to folder with "/" separators. Its files: image_path(folder, None, id).
SAMPLES_RECORD, sample_file_name(index)  "samples.json", "0007.png": what sample.py writes
sample_index(file_name) -> int or None    7 for "0007.png"; None for a name sample_file_name never gives
read_class_folders(root, num_classes) -> ([(k, [paths])], sample.py's record or None)  the images
    of root's ClassK/ subfolders; where sample.py's record is, only the images of its last run.
load_images(paths, image_size, progress=None) -> uint8 [N, 3, S, S]  RGB, resized (antialiased
    bilinear); DataError naming the file for a corrupt or non-image file.
to_model_input(uint8 [..., 3, H, W]) -> float32 in [-1, 1] (x / 127.5 - 1, the 256 levels)
random_hflip(x [B, C, H, W], seed) -> x with each image mirrored left-right with probability 1/2
random_shift(x [B, C, H, W], max_shift, seed) -> x with each image translated by up to max_shift
    pixels along each axis, the edges reflected
LabelledImages(images_uint8, labels)      torch Dataset -> (x float [3, H, W] in [-1, 1], label int)
split_train_val(items, val_fraction, seed) -> (train_items, val_items)  seeded, stratified per label
load_labelled_split(root, split, image_size, num_classes=None, progress=None) -> (items, uint8 images)
split_items(root, train_split, val_split, val_fraction, seed, num_classes=None, report_fraction=0.0,
            report_seed=1) -> (train items, val items, report items, val's CSV path)
    val is <root>/<val_split>.csv where it exists, else a split_train_val of the training CSV;
    the report split, a split_train_val of the rest, is held out of training and of every choice.
load_train_val(root, train_split, val_split, val_fraction, seed, image_size, num_classes=None,
               progress=None, report_fraction=0.0, report_seed=1, train_on_held_out="none")
    -> (train LabelledImages, val LabelledImages or None, {"val": items, "report": items}, source)
    the splits of split_items; the held-out items have ids relative to root. train_on_held_out
    "val" or "val+report" also trains on those (a final model, once the recipe is fixed).
make_demo_dataset(root, seed=0, n_per_class=..., n_val_per_class=..., n_test_per_class=...,
                  image_size=32) -> root  the procedural demo set in the CPEN455 layout (PNG):
    root/train.csv + root/train/, root/val.csv + root/val/ (labelled), root/test.csv + root/test/
    (labels -1, as in CPEN455; the true labels are in root/test_answers.csv). Reused if present.
"""
import csv
import hashlib
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from config import UsageError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEMO_CLASSES = ("disc", "stripes", "checker", "gradient_square")
DEMO_MARKER = ".demo-params.json"
PROGRESS_THRESHOLD = 500  # show a progress bar when loading at least this many images
SAMPLES_RECORD = "samples.json"  # sample.py's record of its last run in a folder: classes, count, seed


class DataError(UsageError):
    """Data that cannot be used; the message is one line naming the file (and row) at fault."""


def class_name(k):
    return f"Class{k}"


def split_csv_path(root, split):
    return os.path.join(root, f"{split}.csv")


def _split_name(csv_path):
    return os.path.splitext(os.path.basename(csv_path))[0]


def _candidates(root, csv_path, item_id):
    rel = item_id.replace("\\", "/")
    if csv_path is None:
        return [os.path.join(root, rel)]
    split_dir = os.path.join(root, _split_name(csv_path))
    csv_dir = os.path.dirname(os.path.abspath(csv_path))
    if "/" in rel:
        return [os.path.join(root, rel), os.path.join(csv_dir, rel)]
    return [os.path.join(split_dir, rel), os.path.join(root, rel), os.path.join(csv_dir, rel)]


def image_path(root, csv_path, item_id):
    """The file of item `item_id` listed in `csv_path` (None for an item of list_image_folder(root)).

    An id with a directory part is relative to root ("train/0000001.jpg"); a bare name is looked
    up in root/<split>/ first (for root/<split>.csv), then in root/. Returns the first candidate
    that exists, else the first candidate.
    """
    candidates = _candidates(root, csv_path, item_id)
    for path in candidates:
        if os.path.isfile(path):
            return path
    return candidates[0]


def item_paths(root, csv_path, items):
    return [image_path(root, csv_path, item_id) for item_id, _ in items]


def _is_header(row):
    return len(row) >= 2 and row[0].strip().lower() == "id" and row[1].strip().lower() == "label"


def read_split_csv(root, csv_path, num_classes=None, allow_unknown=True):
    """Rows (id, label) of a split CSV, with every listed file checked to exist. See the module doc."""
    if not os.path.isdir(root):
        raise DataError(f"data directory not found: {root}")
    items = []
    for where, item_id, label in _labelled_rows(csv_path, num_classes, allow_unknown):
        path = image_path(root, csv_path, item_id)
        if not os.path.isfile(path):
            raise DataError(f"{where}: listed file {item_id!r} does not exist (looked for {path})")
        items.append((item_id, label))
    return items


def parse_split_csv(csv_path, num_classes=None, allow_unknown=True):
    """Rows (id, label) of a split CSV, labels checked but files not looked for."""
    return [(item_id, label) for _, item_id, label in _labelled_rows(csv_path, num_classes, allow_unknown)]


def _labelled_rows(csv_path, num_classes, allow_unknown):
    """Yield (where, id, label) for each data row, where = "<csv>, row N"; one error for a bad row
    or for a CSV without rows."""
    if not os.path.isfile(csv_path):
        raise DataError(f"CSV file not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: cannot read as a CSV ({err})") from None
    found = 0
    for row_number, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if row_number == 1 and _is_header(row):
            if any(cell.strip().startswith("posterior_") for cell in row):
                # metrics against its own predictions would read 100%
                raise DataError(f"{csv_path}: this is classify.py's output, whose label column holds "
                                "predicted labels; give an id,label CSV of the true labels (-1 where unknown)")
            continue
        where = f"{csv_path}, row {row_number}"
        if len(row) < 2 or not row[0].strip():
            raise DataError(f"{where}: expected 'id,label', got {','.join(row)!r}")
        item_id, label_text = row[0].strip(), row[1].strip()
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{where}: label {label_text!r} is not an integer") from None
        low = -1 if allow_unknown else 0
        if label < low or (num_classes is not None and label >= num_classes):
            allowed = f"{low}..{num_classes - 1}" if num_classes is not None else f">= {low}"
            raise DataError(f"{where}: label {label} is outside {allowed}")
        found += 1
        yield where, item_id, label
    if not found:
        raise DataError(f"{csv_path}: no rows")


def list_image_folder(folder):
    """Every image under `folder` (recursively, into linked folders too), sorted, as (id relative
    to folder, -1)."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder}")
    ids, seen = [], set()
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(directory) in seen:  # a link back up, or a second way to one folder
            subdirs.clear()
            continue
        seen.add(os.path.realpath(directory))
        subdirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel = os.path.relpath(os.path.join(directory, name), folder)
                ids.append(rel.replace(os.sep, "/"))
    if not ids:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return [(item_id, -1) for item_id in sorted(ids)]


def sample_file_name(index):
    """The name of sample.py's image `index` of a class, in its ClassK/ folder."""
    return f"{index:04d}.png"


def sample_index(file_name):
    """The index that sample_file_name turned into file_name, or None for any other name."""
    match = re.fullmatch(r"(\d{4,})\.png", file_name)
    return None if match is None else int(match.group(1))


def read_class_folders(root, num_classes):
    """([(k, [file paths])] of root's ClassK/ subfolders in class order (empty: none), sample.py's
    record or None). Where sample.py left its record (root/samples.json), only the images of that
    run: its classes, and its first n_per_class files of each, not those an earlier, larger run
    left beside them. Elsewhere every image in every ClassK/ folder."""
    record_path = os.path.join(root, SAMPLES_RECORD)
    if not os.path.isfile(record_path):
        folders = [(k, os.path.join(root, class_name(k))) for k in range(num_classes)]
        return [(k, item_paths(f, None, list_image_folder(f))) for k, f in folders if os.path.isdir(f)], None
    record = read_samples_record(record_path)
    drawn = [k for k in record["classes"] if k is not None]  # None: an unconditional model's
    if any(type(k) is not int or not 0 <= k < num_classes for k in drawn):
        raise DataError(f"{record_path}: its classes {record['classes']} are not all among the "
                        f"{num_classes} of {class_name(0)}..{class_name(num_classes - 1)}")
    drawn.sort()
    n, found = record["n_per_class"], []
    for k in drawn:
        paths = [os.path.join(root, class_name(k), sample_file_name(i)) for i in range(n)]
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise DataError(f"{missing[0]}: missing ({len(missing)} of the {n} images of {class_name(k)} that "
                            f"{record_path} lists); was the sample.py run stopped?")
        found.append((k, paths))
    return found, record


def read_samples_record(path):
    """sample.py's record (samples.json): at least {"classes": [k or None, ...], "n_per_class": n}."""
    try:
        with open(path) as f:
            record = json.load(f)
        valid = isinstance(record["classes"], list) and type(record["n_per_class"]) is int
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid or record["n_per_class"] < 1:
        raise DataError(f"{path}: not a record written by sample.py (it needs \"classes\" and \"n_per_class\")")
    return record


def load_image(path, image_size):
    """One image file -> uint8 [3, S, S] (RGB, antialiased bilinear resize)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "F"):  # 32-bit levels: no one scale to 8 bits is right
                raise DataError(f"{path}: {img.mode} images (32-bit levels) are not read: save it with 8 or "
                                f"16 bits")
            if img.mode.startswith("I;16"):  # 16-bit grey: convert() would clip it to white
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
            img = img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({first_line(err)})") from None
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)  # [S, S, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_images(paths, image_size, progress=None):
    """Image files -> uint8 [N, 3, S, S]. progress: None = a tqdm bar for long lists."""
    paths = list(paths)
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    if progress is None:
        progress = len(paths) >= PROGRESS_THRESHOLD
    iterator = paths
    if progress:
        from tqdm import tqdm
        iterator = tqdm(paths, desc="loading images", unit="img", leave=False)
    for i, path in enumerate(iterator):
        out[i] = load_image(path, image_size)
    return out


def to_model_input(images):
    """uint8 images -> float32 in [-1, 1] on the 256 levels k / 127.5 - 1."""
    return images.float() / 127.5 - 1.0


def random_hflip(x, seed):
    """Mirror each image of [B, C, H, W] left-right with probability 1/2, drawn from `seed`."""
    flip = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) < 0.5  # [B]
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_shift(x, max_shift, seed):
    """Translate each image of [B, C, H, W] by (dy, dx), each drawn uniformly from
    -max_shift..max_shift with a generator seeded by `seed`. Reflected edges keep every value on
    the image's own levels, with no constant border for the likelihood to learn."""
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=torch.Generator().manual_seed(seed))
    padded = F.pad(x, [max_shift] * 4, mode="reflect")  # [B, C, H + 2s, W + 2s]
    height, width = x.shape[-2:]
    return torch.stack([image[:, dy:dy + height, dx:dx + width]
                        for image, (dy, dx) in zip(padded, offsets.tolist())])


class LabelledImages(torch.utils.data.Dataset):
    """Preloaded uint8 images [N, 3, H, W] and labels [N] -> (x float [3, H, W] in [-1, 1], label)."""

    def __init__(self, images, labels):
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
        self.images, self.labels = images, labels

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, index):
        return to_model_input(self.images[index]), int(self.labels[index])


def split_train_val(items, val_fraction, seed):
    """Carve a validation split: per label, a seeded round(n * val_fraction) of its items (at least
    one when val_fraction > 0 and the label has 2+ items). Both parts keep the input order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(items), []
    by_label = {}
    for index, (_, label) in enumerate(items):
        by_label.setdefault(label, []).append(index)
    rng = np.random.RandomState(seed)
    val_indices = set()
    for label in sorted(by_label):
        indices = by_label[label]
        n_val = int(round(len(indices) * val_fraction))
        if len(indices) >= 2:
            n_val = min(max(n_val, 1), len(indices) - 1)
        else:
            n_val = 0
        chosen = rng.permutation(len(indices))[:n_val]
        val_indices.update(indices[i] for i in chosen)
    train = [item for i, item in enumerate(items) if i not in val_indices]
    val = [item for i, item in enumerate(items) if i in val_indices]
    return train, val



def load_labelled_split(root, split, image_size, num_classes=None, progress=None):
    """<root>/<split>.csv with every label known -> (items, uint8 images [N, 3, S, S])."""
    csv_path = split_csv_path(root, split)
    items = read_split_csv(root, csv_path, num_classes=num_classes, allow_unknown=False)
    return items, load_images(item_paths(root, csv_path, items), image_size, progress)


def split_items(root, train_split, val_split, val_fraction, seed, num_classes=None, report_fraction=0.0,
                report_seed=1):
    """-> (train items, val items, report items, val's CSV path): the items a training run with
    these keys uses, without loading an image. Validation is <root>/<val_split>.csv where it
    exists, else split_train_val(val_fraction, seed) of <root>/<train_split>.csv. The report split,
    split_train_val(report_fraction, report_seed) of what is left, is held out of training and of
    every choice."""
    train_csv = split_csv_path(root, train_split)
    items = read_split_csv(root, train_csv, num_classes=num_classes, allow_unknown=False)
    val_csv = split_csv_path(root, val_split) if val_split else None
    if val_csv and os.path.isfile(val_csv):
        train_items, val_items = items, read_split_csv(root, val_csv, num_classes=num_classes, allow_unknown=False)
    else:
        (train_items, val_items), val_csv = split_train_val(items, val_fraction, seed), train_csv
    train_items, report_items = split_train_val(train_items, report_fraction, report_seed)
    check_held_out_apart(root, train_csv, train_items,
                         {"validation": (val_csv, val_items), "report": (train_csv, report_items)})
    return train_items, val_items, report_items, val_csv


def check_held_out_apart(root, train_csv, train_items, held_out):
    """DataError where a held-out image is also a training image (a CSV that lists an image twice,
    or a val.csv that repeats train.csv's): the run would evaluate on images it trains on.
    held_out: {name: (its CSV, its items)}."""
    def files(csv_path, items):
        return {os.path.normpath(image_path(root, csv_path, item_id)) for item_id, _ in items}
    trained = files(train_csv, train_items)
    for name, (csv_path, items) in held_out.items():
        shared = trained & files(csv_path, items)
        if shared:
            raise DataError(f"{csv_path}: {len(shared)} {name} images are training images too (such as "
                            f"{min(shared)}), so the run would evaluate on images it trains on: list each "
                            f"image once")


def load_train_val(root, train_split, val_split, val_fraction, seed, image_size, num_classes=None,
                   progress=None, report_fraction=0.0, report_seed=1, train_on_held_out="none"):
    """-> (train LabelledImages, val LabelledImages or None, {"val": items, "report": items}, where
    val came from): the splits of split_items, with the images of the first two; of the report
    split only its (id, label) items, for classify.py. train_on_held_out ("none", "val" or
    "val+report") adds the validation images, or those and the report split's, to the training
    images; the splits stay the same, so classify.py --held-out still finds them."""
    train_items, val_items, report_items, val_csv = split_items(
        root, train_split, val_split, val_fraction, seed, num_classes, report_fraction, report_seed)
    train_csv = split_csv_path(root, train_split)
    if not train_items:
        raise DataError(f"{train_csv}: no training images left after the validation and report splits")

    def labelled_images(csv_path, items):
        images = load_images(item_paths(root, csv_path, items), image_size, progress)
        return LabelledImages(images, [label for _, label in items])
    held = {"val": (val_csv, val_items), "report": (train_csv, report_items)}
    also = [held[name] for name in train_on_held_out.split("+") if name in held]  # "none": nothing
    trained_on = [(train_csv, train_items)] + also
    parts = [labelled_images(csv_path, items) for csv_path, items in trained_on if items]
    train = LabelledImages(torch.cat([part.images for part in parts]),
                           torch.cat([part.labels for part in parts]))
    val = labelled_images(val_csv, val_items) if val_items else None
    source = f"{val_fraction:g} of {train_split}.csv" if val_csv == train_csv else f"{val_split}.csv"
    held_out = {"val": root_relative(root, val_csv, val_items),
                "report": root_relative(root, train_csv, report_items)}
    return train, val, held_out, source


def root_relative(root, csv_path, items):
    """The items with ids relative to root ("/"-separated), which a CSV anywhere can list."""
    return [(os.path.relpath(image_path(root, csv_path, item_id), root).replace(os.sep, "/"), label)
            for item_id, label in items]


def items_digest(items):
    """A fingerprint of a set of (id, label) items, whatever their order: train.py stores those of
    its held-out splits, and classify.py --held-out checks that it recomputed the same images."""
    text = "".join(f"{item_id},{label}\n" for item_id, label in sorted(items))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The procedural demo data set.

def _jitter(rng, base, amount=35):
    return np.clip(np.asarray(base, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255)


def demo_image(label, rng, size=32):
    """One procedural demo image of class `label` (0..3), uint8 [size, size, 3].

    0 "disc": a warm disc on a dark blue background; 1 "stripes": green and yellow stripes;
    2 "checker": a purple and white checkerboard; 3 "gradient_square": a teal-to-grey gradient
    with a white square. Positions, sizes, periods and colours are jittered.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    s = size / 32.0
    img = np.zeros((size, size, 3))
    if label == 0:
        img[:] = _jitter(rng, (30, 40, 110))
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        radius = rng.uniform(0.18, 0.32) * size
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        img[inside] = _jitter(rng, (220, 90, 40))
    elif label == 1:
        period = rng.uniform(5, 9) * s
        phase = rng.uniform(0, period)
        coord = yy if rng.rand() < 0.5 else xx
        band = ((coord + phase) % period) < period / 2
        a, b = _jitter(rng, (40, 170, 60)), _jitter(rng, (230, 220, 70))
        img[:] = np.where(band[..., None], a, b)
    elif label == 2:
        cell = max(1, int(round(rng.uniform(3, 7) * s)))
        oy, ox = rng.randint(0, cell, 2)
        band = (((yy.astype(int) + oy) // cell + (xx.astype(int) + ox) // cell) % 2) == 0
        a, b = _jitter(rng, (120, 40, 150)), _jitter(rng, (235, 235, 235), 20)
        img[:] = np.where(band[..., None], a, b)
    elif label == 3:
        angle = rng.uniform(0, 2 * np.pi)
        t = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5
        t = np.clip(t, 0, 1)[..., None]
        a, b = _jitter(rng, (20, 150, 150)), _jitter(rng, (110, 110, 110))
        img[:] = a * (1 - t) + b * t
        side = int(round(rng.uniform(0.2, 0.35) * size))
        y0, x0 = rng.randint(0, size - side + 1, 2)
        img[y0:y0 + side, x0:x0 + side] = _jitter(rng, (240, 240, 240), 15)
    else:
        raise ValueError(f"demo classes are 0..{len(DEMO_CLASSES) - 1}, got {label}")
    img += rng.normal(0, 4, img.shape)  # a little sensor noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _write_demo_split(root, split, labels, rng, image_size, known_labels):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    rows = []
    for index, label in enumerate(labels, start=1):
        item_id = f"{split}/{index:07d}.png"
        Image.fromarray(demo_image(label, rng, image_size)).save(os.path.join(root, item_id))
        rows.append((item_id, label))
    tmp = split_csv_path(root, split) + ".tmp"
    with open(tmp, "w", newline="") as f:  # CPEN455 style: no header, CRLF
        for item_id, label in rows:
            f.write(f"{item_id},{label if known_labels else -1}\r\n")
    os.replace(tmp, split_csv_path(root, split))
    return rows


def make_demo_dataset(root, seed=0, n_per_class=200, n_val_per_class=50, n_test_per_class=50,
                      image_size=32):
    """Write (or reuse) the procedural demo data set under `root`; returns root. Deterministic in
    all arguments. Refuses to write into a non-empty directory that is not a demo data set."""
    params = {"seed": seed, "n_per_class": n_per_class, "n_val_per_class": n_val_per_class,
              "n_test_per_class": n_test_per_class, "image_size": image_size, "version": 1}
    marker = os.path.join(root, DEMO_MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                if json.load(f) == params:
                    return root
        except (OSError, ValueError):
            pass
        os.remove(marker)
    elif os.path.isdir(root) and os.listdir(root):
        raise DataError(f"{root}: not empty and not a demo data set; refusing to write the demo data there")
    os.makedirs(root, exist_ok=True)
    _write_marker(marker, {**params, "complete": False})  # a generation cut short is redone, not refused
    rng = np.random.RandomState(seed)
    num_classes = len(DEMO_CLASSES)
    for split, n, known in (("train", n_per_class, True), ("val", n_val_per_class, True),
                            ("test", n_test_per_class, False)):
        labels = list(rng.permutation(np.repeat(np.arange(num_classes), n)))
        rows = _write_demo_split(root, split, [int(l) for l in labels], rng, image_size, known)
        if split == "test":
            with open(os.path.join(root, "test_answers.csv"), "w", newline="") as f:
                for item_id, label in rows:
                    f.write(f"{item_id},{label}\r\n")
    _write_marker(marker, params)
    return root


def _write_marker(marker, params):
    with open(marker + ".tmp", "w") as f:
        json.dump(params, f)
    os.replace(marker + ".tmp", marker)
