import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dataset as ds  # noqa: E402

REAL_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cpen455")


def write_png(path, color=(10, 20, 30), size=8, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    value = color if mode == "RGB" else color[0]
    Image.new(mode, (size, size), value).save(path)


def make_layout(root, rows, content, split="train"):
    """rows: list of (file name relative to root, label); content: the CSV text."""
    for name, _ in rows:
        write_png(os.path.join(root, name))
    csv_path = os.path.join(root, f"{split}.csv")
    with open(csv_path, "w", newline="") as f:
        f.write(content)
    return csv_path


def test_class_name():
    assert ds.class_name(0) == "Class0" and ds.class_name(3) == "Class3"


def test_cpen455_layout_crlf_no_header(tmp_path):
    rows = [("train/0000001.jpg", 0), ("train/0000002.jpg", 3)]
    csv_path = make_layout(str(tmp_path), rows, "train/0000001.jpg,0\r\ntrain/0000002.jpg,3\r\n")
    items = ds.read_split_csv(str(tmp_path), csv_path, num_classes=4)
    assert items == rows
    assert ds.image_path(str(tmp_path), csv_path, "train/0000002.jpg") == os.path.join(
        str(tmp_path), "train/0000002.jpg")


def test_a_bare_id_is_looked_up_in_the_split_folder_first(tmp_path):
    root = str(tmp_path)
    for folder in ("train", ""):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        open(os.path.join(root, folder, "a.png"), "wb").close()
    csv_path = os.path.join(root, "train.csv")
    assert ds.image_path(root, csv_path, "a.png") == os.path.join(root, "train", "a.png")  # not root/a.png
    os.remove(os.path.join(root, "train", "a.png"))
    assert ds.image_path(root, csv_path, "a.png") == os.path.join(root, "a.png")


def test_header_and_lf(tmp_path):
    rows = [("train/a.png", 1), ("train/b.png", 2)]
    csv_path = make_layout(str(tmp_path), rows, "id,label\ntrain/a.png,1\ntrain/b.png,2\n")
    assert ds.read_split_csv(str(tmp_path), csv_path) == rows


def test_a_predictions_csv_is_refused_as_labels(tmp_path):
    rows = [("train/a.png", 1)]
    csv_path = make_layout(str(tmp_path), rows, "id,label,loglik_Class0,posterior_Class0\ntrain/a.png,1,-9.5,1.0\n")
    with pytest.raises(ds.DataError, match="predicted labels"):
        ds.read_split_csv(str(tmp_path), csv_path)


def test_a_held_out_image_that_is_also_a_training_image_is_refused(tmp_path):
    root = str(tmp_path)
    rows = [("train/a.png", 0), ("train/b.png", 1), ("train/c.png", 1)]
    make_layout(root, rows, "train/a.png,0\ntrain/b.png,1\ntrain/c.png,1\n")
    assert [len(part) for part in ds.split_items(root, "train", "val", 0.0, seed=0)[:3]] == [3, 0, 0]
    make_layout(root, [], "train/b.png,1\n", split="val")  # val.csv repeats a training image
    with pytest.raises(ds.DataError, match="1 validation images are training images too"):
        ds.split_items(root, "train", "val", 0.0, seed=0)
    os.remove(os.path.join(root, "val.csv"))
    make_layout(root, [], "train/a.png,0\ntrain/a.png,0\ntrain/b.png,1\ntrain/c.png,1\n")  # a.png twice
    with pytest.raises(ds.DataError, match="validation images are training images too"):
        ds.split_items(root, "train", "val", 0.5, seed=0)  # one a.png to each side


def test_bare_names_resolve_under_split_dir(tmp_path):
    root = str(tmp_path)
    for name in ("a.png", "b.png"):
        write_png(os.path.join(root, "test", name))
    csv_path = os.path.join(root, "test.csv")
    with open(csv_path, "w", newline="") as f:
        f.write("a.png,-1\r\nb.png,-1\r\n")
    items = ds.read_split_csv(root, csv_path)
    assert items == [("a.png", -1), ("b.png", -1)]
    paths = ds.item_paths(root, csv_path, items)
    assert paths == [os.path.join(root, "test", "a.png"), os.path.join(root, "test", "b.png")]
    images = ds.load_images(paths, 8)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8


def test_plain_folder_recursive_sorted(tmp_path):
    root = str(tmp_path)
    write_png(os.path.join(root, "b.PNG"))
    write_png(os.path.join(root, "sub", "a.jpg"))
    write_png(os.path.join(root, "a.webp"))
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    items = ds.list_image_folder(root)
    assert items == [("a.webp", -1), ("b.PNG", -1), ("sub/a.jpg", -1)]
    assert os.path.isfile(ds.image_path(root, None, "sub/a.jpg"))


def test_a_linked_folder_is_read_and_a_link_back_up_ends(tmp_path):
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    write_png(str(root / "a.png"))
    write_png(str(elsewhere / "b.png"))
    os.symlink(elsewhere, root / "linked")
    os.symlink(root, root / "linked_up")  # a loop: it must not be walked forever
    assert ds.list_image_folder(str(root)) == [("a.png", -1), ("linked/b.png", -1)]


def write_sample_folders(root, n_per_class, classes=(0, 1, 2)):
    """sample.py's layout without its record: root/ClassK/0000.png, ..."""
    for k in classes:
        for i in range(n_per_class):
            write_png(os.path.join(root, ds.class_name(k), ds.sample_file_name(i)), color=(k, i, 0))


def test_a_sample_file_name_gives_back_its_index():
    assert [ds.sample_index(ds.sample_file_name(i)) for i in (0, 7, 12345)] == [0, 7, 12345]
    assert [ds.sample_index(name) for name in ("7.png", "0007.jpg", "grid_Class0.png", "0007.png~")] == [None] * 4


def test_class_folders_are_read_whole_or_as_sample_py_recorded_them(tmp_path):
    root = str(tmp_path)
    write_sample_folders(root, 3)  # an earlier run: three classes, three images each
    folders, record = ds.read_class_folders(root, 3)
    assert record is None and [(k, len(paths)) for k, paths in folders] == [(0, 3), (1, 3), (2, 3)]
    # a later run drew two images of classes 2 and 0 into the same folder, and recorded them
    with open(os.path.join(root, ds.SAMPLES_RECORD), "w") as f:
        json.dump({"classes": [2, 0], "n_per_class": 2, "seed": 5}, f)
    folders, record = ds.read_class_folders(root, 3)
    assert record["seed"] == 5
    assert folders == [(k, [os.path.join(root, ds.class_name(k), name) for name in ("0000.png", "0001.png")])
                       for k in (0, 2)]


@pytest.mark.parametrize("record, message", [
    ({"classes": [0], "n_per_class": 4}, r"Class0.0002\.png: missing \(2 of the 4"),
    ({"classes": [0, 3], "n_per_class": 1}, r"its classes \[0, 3\] are not all among the 3"),
    ({"classes": ["Class1", 0], "n_per_class": 1}, r"its classes \['Class1', 0\] are not all among"),
    ({"classes": [0]}, "not a record written by sample.py"),
    ({"classes": [0], "n_per_class": 0}, "not a record written by sample.py"),
    ([0, 1], "not a record written by sample.py"),
])
def test_a_sample_record_that_does_not_fit_its_folder_is_refused(tmp_path, record, message):
    write_sample_folders(str(tmp_path), 2)
    (tmp_path / ds.SAMPLES_RECORD).write_text(json.dumps(record))
    with pytest.raises(ds.DataError, match=message):
        ds.read_class_folders(str(tmp_path), 3)


def test_grayscale_and_rgba_become_rgb_and_resize(tmp_path):
    gray = str(tmp_path / "g.png")
    write_png(gray, color=(200, 0, 0), size=16, mode="L")
    rgba = str(tmp_path / "r.png")
    os.makedirs(tmp_path, exist_ok=True)
    Image.new("RGBA", (16, 16), (1, 2, 3, 100)).save(rgba)
    images = ds.load_images([gray, rgba], 8)
    assert images.shape == (2, 3, 8, 8)
    assert torch.all(images[0] == 200)
    assert images[1, :, 0, 0].tolist() == [1, 2, 3]


def test_16_bit_grey_keeps_its_levels_and_32_bit_levels_are_refused(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(levels * 257).save(tmp_path / "g16.png")  # 16-bit grey: level v is 257 v
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    sixteen, eight = ds.load_images([tmp_path / "g16.png", tmp_path / "g8.png"], 16)
    assert torch.equal(sixteen, eight) and sixteen[0].flatten().tolist() == list(range(256))
    Image.fromarray(levels.astype(np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ds.DataError, match="32-bit levels"):
        ds.load_images([tmp_path / "f.tiff"], 16)


def test_to_model_input_levels():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    y = ds.to_model_input(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.allclose(y[0, 0].flatten(), torch.arange(256) / 127.5 - 1)


def test_labelled_images():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    data = ds.LabelledImages(images, [0, 1, 2, 3, 0])
    x, label = data[3]
    assert x.shape == (3, 8, 8) and label == 3 and isinstance(label, int)
    assert len(data) == 5


def test_split_train_val_deterministic_and_stratified():
    items = [(f"x{i}", i % 4) for i in range(100)]
    train, val = ds.split_train_val(items, 0.2, seed=3)
    assert ds.split_train_val(items, 0.2, seed=3) == (train, val)
    assert ds.split_train_val(items, 0.2, seed=4) != (train, val)
    assert len(val) == 20 and sorted(train + val) == sorted(items)
    assert [sum(1 for _, l in val if l == k) for k in range(4)] == [5, 5, 5, 5]
    assert ds.split_train_val(items, 0.0, seed=0) == (items, [])
    # a class too small for round(n * fraction) still gives one item, and a lone item stays in training
    small = [("a0", 0), ("a1", 0), ("a2", 0), ("b0", 1)] + [(f"c{i}", 2) for i in range(20)]
    _, val = ds.split_train_val(small, 0.1, seed=0)
    assert sorted(label for _, label in val) == [0, 2, 2]


def tree_digest(root):
    h = hashlib.sha256()
    for directory, subdirs, files in sorted(os.walk(root)):
        subdirs.sort()
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(directory, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_train_val_and_report_splits_partition_the_training_csv(tmp_path):
    """Validation is carved first (seed), the report split from the rest (report_seed); the
    held-out items name their files relative to the root, so a CSV anywhere can list them."""
    root = str(tmp_path / "data")
    names = [f"{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        write_png(os.path.join(root, "train", name), color=(10 * i, 0, 0))
    with open(os.path.join(root, "train.csv"), "w", newline="") as f:
        f.write("".join(f"{name},{i % 2}\r\n" for i, name in enumerate(names)))  # bare names
    train, val, held_out, source = ds.load_train_val(root, "train", "val", 0.25, 0, 8, 2, progress=False,
                                                     report_fraction=0.25, report_seed=1)
    assert (len(train), len(val), len(held_out["report"])) == (14, 6, 4) and source == "0.25 of train.csv"
    val_ids, report_ids = [i for i, _ in held_out["val"]], [i for i, _ in held_out["report"]]
    assert not set(val_ids) & set(report_ids)
    assert all(i.startswith("train/") for i in val_ids + report_ids)
    assert sorted(label for _, label in held_out["report"]) == [0, 0, 1, 1]  # stratified
    listed = str(tmp_path / "elsewhere" / "report.csv")
    os.makedirs(os.path.dirname(listed))
    with open(listed, "w") as f:
        f.write("".join(f"{i},{label}\n" for i, label in held_out["report"]))
    report = ds.load_images(ds.item_paths(root, listed, ds.read_split_csv(root, listed)), 8)
    every = ds.load_images(ds.item_paths(root, os.path.join(root, "train.csv"), [(n, 0) for n in names]), 8)
    # the three parts hold each training image exactly once
    parts = torch.cat([train.images, val.images, report]).flatten(1)
    assert sorted(map(tuple, parts.tolist())) == sorted(map(tuple, every.flatten(1).tolist()))
    again = ds.load_train_val(root, "train", "val", 0.25, 0, 8, 2, progress=False, report_fraction=0.25,
                              report_seed=1)
    assert again[2] == held_out and torch.equal(again[0].images, train.images)


def test_a_final_model_trains_on_held_out_images_but_the_splits_stay_the_same(tmp_path):
    root = str(tmp_path / "data")
    names = [f"{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        write_png(os.path.join(root, "train", name), color=(10 * i, 0, 0))
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("".join(f"{name},{i % 2}\n" for i, name in enumerate(names)))
    kwargs = dict(progress=False, report_fraction=0.25, report_seed=1)
    train, val, held_out, _ = ds.load_train_val(root, "train", "val", 0.25, 0, 8, 2, **kwargs)
    for trained_on, extra in (("val", 6), ("val+report", 10)):
        final = ds.load_train_val(root, "train", "val", 0.25, 0, 8, 2, train_on_held_out=trained_on, **kwargs)
        assert final[2] == held_out and torch.equal(final[1].images, val.images)
        assert len(final[0]) == len(train) + extra and torch.equal(final[0].images[:len(train)], train.images)
        assert final[0].labels.tolist()[len(train):len(train) + 6] == val.labels.tolist()
    every = sorted(map(tuple, final[0].images.flatten(1).tolist()))  # val+report: all of train.csv
    assert len(every) == len(names) and len(set(every)) == len(names)  # each image once


def test_demo_dataset_deterministic_and_readable(tmp_path):
    kwargs = dict(seed=5, n_per_class=3, n_val_per_class=2, n_test_per_class=1, image_size=16)
    a = ds.make_demo_dataset(str(tmp_path / "a"), **kwargs)
    b = ds.make_demo_dataset(str(tmp_path / "b"), **kwargs)
    assert tree_digest(a) == tree_digest(b)
    mtime = os.path.getmtime(os.path.join(a, "train.csv"))
    ds.make_demo_dataset(a, **kwargs)  # reused, not rewritten
    assert os.path.getmtime(os.path.join(a, "train.csv")) == mtime
    c = ds.make_demo_dataset(str(tmp_path / "c"), **{**kwargs, "seed": 6})
    assert tree_digest(a) != tree_digest(c)
    train = ds.read_split_csv(a, ds.split_csv_path(a, "train"), num_classes=4, allow_unknown=False)
    assert sorted(label for _, label in train) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    test = ds.read_split_csv(a, ds.split_csv_path(a, "test"), num_classes=4)
    assert {label for _, label in test} == {-1}
    with open(ds.split_csv_path(a, "train"), "rb") as f:
        assert b"\r\n" in f.read()
    images = ds.load_images(ds.item_paths(a, ds.split_csv_path(a, "train"), train), 16)
    assert images.shape == (12, 3, 16, 16)
    # the classes differ clearly in colour statistics
    means = torch.stack([images[[i for i, (_, l) in enumerate(train) if l == k]].float().mean((0, 2, 3))
                         for k in range(4)])
    assert torch.cdist(means, means).add(torch.eye(4) * 1e3).min() > 10


def test_a_demo_generation_cut_short_is_redone(tmp_path, monkeypatch):
    kwargs = dict(seed=5, n_per_class=3, n_val_per_class=2, n_test_per_class=1, image_size=16)
    whole = ds.make_demo_dataset(str(tmp_path / "whole"), **kwargs)
    real_write = ds._write_demo_split

    def killed_after_train(root, split, *args):
        if split != "train":
            raise KeyboardInterrupt
        return real_write(root, split, *args)
    monkeypatch.setattr(ds, "_write_demo_split", killed_after_train)
    cut = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        ds.make_demo_dataset(cut, **kwargs)
    monkeypatch.undo()
    assert tree_digest(ds.make_demo_dataset(cut, **kwargs)) == tree_digest(whole)


def test_demo_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ds.DataError, match="refusing"):
        ds.make_demo_dataset(str(tmp_path), n_per_class=1, n_val_per_class=1, n_test_per_class=1)


# --- bad inputs: each raises DataError naming the file (and row) -----------------------------

def test_missing_root(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ds.DataError, match="nope"):
        ds.read_split_csv(missing, os.path.join(missing, "train.csv"))
    with pytest.raises(ds.DataError, match="nope"):
        ds.list_image_folder(missing)


def test_missing_csv(tmp_path):
    with pytest.raises(ds.DataError, match="train.csv"):
        ds.read_split_csv(str(tmp_path), str(tmp_path / "train.csv"))


def test_empty_folder(tmp_path):
    with pytest.raises(ds.DataError, match="no images"):
        ds.list_image_folder(str(tmp_path))


def test_missing_listed_file(tmp_path):
    csv_path = make_layout(str(tmp_path), [("train/a.png", 0)], "train/a.png,0\r\ntrain/gone.png,1\r\n")
    with pytest.raises(ds.DataError, match=r"train\.csv, row 2: listed file 'train/gone.png'"):
        ds.read_split_csv(str(tmp_path), csv_path)
    # the labels alone, for tools that never open the images (bench/calibration.py)
    assert ds.parse_split_csv(csv_path) == [("train/a.png", 0), ("train/gone.png", 1)]


@pytest.mark.parametrize("content, message", [
    ("train/a.png\r\n", "row 1: expected 'id,label'"),
    ("train/a.png,0\r\ntrain/a.png,cat\r\n", "row 2: label 'cat' is not an integer"),
    ("train/a.png,4\r\n", r"row 1: label 4 is outside -1\.\.3"),
    ("train/a.png,-2\r\n", "row 1: label -2 is outside"),
])
def test_malformed_rows(tmp_path, content, message):
    csv_path = make_layout(str(tmp_path), [("train/a.png", 0)], content)
    with pytest.raises(ds.DataError, match=message) as info:
        ds.read_split_csv(str(tmp_path), csv_path, num_classes=4)
    assert "train.csv" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ds.DataError, match=message):
        ds.parse_split_csv(csv_path, num_classes=4)


def test_unknown_label_rejected_for_training(tmp_path):
    csv_path = make_layout(str(tmp_path), [("train/a.png", 0)], "train/a.png,-1\r\n")
    assert ds.read_split_csv(str(tmp_path), csv_path, num_classes=4) == [("train/a.png", -1)]
    with pytest.raises(ds.DataError, match=r"row 1: label -1 is outside 0\.\.3"):
        ds.read_split_csv(str(tmp_path), csv_path, num_classes=4, allow_unknown=False)


@pytest.mark.parametrize("payload", [b"this is not an image", b"", b"\x89PNG\r\n\x1a\n\x00\x00garbage"])
def test_corrupt_image(tmp_path, payload):
    path = tmp_path / "bad.jpg"
    path.write_bytes(payload)
    good = str(tmp_path / "good.png")
    write_png(good)
    with pytest.raises(ds.DataError, match="bad.jpg") as info:
        ds.load_images([good, str(path)], 8)
    assert "\n" not in str(info.value)


def test_an_image_too_large_to_decode_is_a_data_error(tmp_path, monkeypatch):
    """Pillow refuses images of more than twice MAX_IMAGE_PIXELS (a decompression bomb)."""
    path = str(tmp_path / "huge.png")
    write_png(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ds.DataError, match="huge.png: not a readable image"):
        ds.load_images([path], 8)


def test_truncated_jpeg(tmp_path):
    path = str(tmp_path / "cut.jpg")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ds.DataError, match="cut.jpg"):
        ds.load_images([path], 8)


# --- the real CPEN455 data, read only -----------------------------------------------------------

@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_ROOT, "train.csv")), reason="no CPEN455 data")
def test_real_cpen455_csvs():
    train = ds.read_split_csv(REAL_ROOT, ds.split_csv_path(REAL_ROOT, "train"), num_classes=4,
                              allow_unknown=False)
    assert len(train) > 1000 and train[0][0].startswith("train/")
    assert {label for _, label in train} == {0, 1, 2, 3}
    test = ds.read_split_csv(REAL_ROOT, ds.split_csv_path(REAL_ROOT, "test"), num_classes=4)
    assert {label for _, label in test} == {-1}
    paths = ds.item_paths(REAL_ROOT, ds.split_csv_path(REAL_ROOT, "train"), train[:16])
    images = ds.load_images(paths, 32)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8


def test_random_hflip_mirrors_about_half_the_batch_reproducibly():
    x = torch.randn(200, 3, 4, 4)
    out = ds.random_hflip(x, seed=7)
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(m != k for m, k in zip(mirrored, kept))  # each image is one or the other
    assert 70 < sum(mirrored) < 130
    assert torch.equal(out, ds.random_hflip(x, seed=7))
    assert not torch.equal(out, ds.random_hflip(x, seed=8))


def test_random_shift_translates_each_image_with_reflected_edges_reproducibly():
    x = torch.randn(100, 3, 8, 8)
    out = ds.random_shift(x, 2, seed=7)
    assert out.shape == x.shape and torch.equal(out, ds.random_shift(x, 2, seed=7))
    assert not torch.equal(out, ds.random_shift(x, 2, seed=8))
    padded = torch.nn.functional.pad(x, [2] * 4, mode="reflect")  # the reflection, written once more
    offsets = set()
    for o, p in zip(out, padded):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(o, p[:, dy:dy + 8, dx:dx + 8])]
        assert len(matches) == 1  # each image is exactly one translation of its reflected self
        offsets.add(matches[0])
    assert len(offsets) > 15  # of the 25 (dy, dx), nearly all are drawn
    assert torch.equal(ds.random_shift(x, 0, seed=7), x)
