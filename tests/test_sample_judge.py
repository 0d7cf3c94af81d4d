"""bench/sample_judge.py: a judge trained on the procedural classes labels samples of the right
class as that class and shuffled ones not; a saved judge and a retrained one with the same seed
give the same figures; its augmentation only mirrors and shifts; bad inputs exit 2 with one line."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # appended: bench/sampling.py must not shadow sampling.py

import sample_judge  # noqa: E402
from dataset import class_name, demo_image, make_demo_dataset, sample_file_name  # noqa: E402

EPOCHS = 8
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")  # 32 samples, 128 features


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A CPEN455-layout root (train.csv, 40 images per class) of the four procedural classes."""
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_per_class=40, n_val_per_class=1,
                             n_test_per_class=1)


def write_samples(folder, n_per_class, seed, folder_of=lambda k: k, draw=demo_image):
    """sample.py's layout: folder/ClassK/*.png, holding images of class k in folder ClassK for
    K = folder_of(k)."""
    rng = np.random.RandomState(seed)
    for k in range(4):
        class_folder = os.path.join(folder, class_name(folder_of(k)))
        os.makedirs(class_folder, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(draw(k, rng)).save(os.path.join(class_folder, f"{i:03d}.png"))
    return str(folder)


def noise_image(label, rng):
    return rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)


def judge(capsys, *argv):
    """Run the script's main on argv plus --out; -> (exit code, its JSON result)."""
    out = os.path.join(os.path.dirname(argv[argv.index("--samples") + 1]), "result.json")
    code = sample_judge.main([*argv, "--no-progress", "--threads", "1", "--out", out])
    capsys.readouterr()
    with open(out) as f:
        return code, json.load(f)


@pytest.fixture(scope="module")
def saved_judge(demo_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge")
    path = str(folder / "judge.pt")
    assert sample_judge.main(["--data-dir", demo_root, "--epochs", str(EPOCHS), "--save-judge", path,
                              "--no-progress", "--threads", "1"]) == 0
    return path


def test_true_class_samples_score_high_and_shuffled_ones_low(demo_root, saved_judge, tmp_path, capsys):
    right = write_samples(tmp_path / "right", 8, seed=1)
    shuffled = write_samples(tmp_path / "shuffled", 8, seed=1, folder_of=lambda k: (k + 1) % 4)
    noise = write_samples(tmp_path / "noise", 8, seed=1, draw=noise_image)

    _, on_right = judge(capsys, "--data-dir", demo_root, "--judge", saved_judge, "--samples", right)
    _, on_shuffled = judge(capsys, "--data-dir", demo_root, "--judge", saved_judge, "--samples", shuffled)
    _, on_noise = judge(capsys, "--data-dir", demo_root, "--judge", saved_judge, "--samples", noise)

    assert on_right["validation"]["share"] >= 0.75  # the judge tells the real classes apart
    assert on_right["samples"]["share"] >= 0.75
    assert on_shuffled["samples"]["share"] <= 0.25
    for name, row in on_right["samples"]["per_class"].items():
        assert row["n"] == 8 and sum(row["labelled_as"]) == 8
        assert row["labelled_as"][int(name[-1])] == row["correct"]
    assert on_right["samples"]["correct"] == sum(r["correct"] for r in on_right["samples"]["per_class"].values())
    # Real-looking samples sit near the validation images in the judge's features; noise does not.
    assert on_right["frechet"]["samples"] < on_noise["frechet"]["samples"]
    assert on_right["frechet"]["training_images"] == on_noise["frechet"]["training_images"]


def test_a_saved_judge_gives_what_a_retrained_one_with_the_same_seed_gives(demo_root, saved_judge, tmp_path,
                                                                            capsys):
    samples = write_samples(tmp_path / "samples", 4, seed=2)
    _, retrained = judge(capsys, "--data-dir", demo_root, "--epochs", str(EPOCHS), "--samples", samples)
    _, reused = judge(capsys, "--data-dir", demo_root, "--judge", saved_judge, "--samples", samples)
    for key in ("validation", "samples", "frechet"):  # on a CPU, one seed and one thread: the same judge
        assert reused[key] == retrained[key]


def test_samples_of_some_classes_only(demo_root, saved_judge, tmp_path, capsys):
    samples = write_samples(tmp_path / "samples", 4, seed=3)
    os.rename(os.path.join(samples, class_name(2)), tmp_path / "elsewhere")
    _, result = judge(capsys, "--data-dir", demo_root, "--judge", saved_judge, "--samples", samples)
    assert sorted(result["samples"]["per_class"]) == [class_name(k) for k in (0, 1, 3)]
    assert result["samples"]["n"] == 12


def test_only_the_images_sample_py_recorded_are_judged(demo_root, saved_judge, tmp_path, capsys):
    samples = write_samples(tmp_path / "samples", 3, seed=4, draw=noise_image)  # an earlier run's
    for k in range(4):  # sample.py's names, then a later run of two images of classes 0 and 2
        folder = os.path.join(samples, class_name(k))
        for i, name in enumerate(sorted(os.listdir(folder))):
            os.rename(os.path.join(folder, name), os.path.join(folder, sample_file_name(i)))
    write_samples(tmp_path / "later", 2, seed=4)
    for k in (0, 2):
        for i in range(2):
            os.replace(tmp_path / "later" / class_name(k) / f"{i:03d}.png",
                       os.path.join(samples, class_name(k), sample_file_name(i)))
    record = {"checkpoint": "c.pt", "classes": [2, 0], "n_per_class": 2, "seed": 9, "guidance": 1.0}
    with open(os.path.join(samples, "samples.json"), "w") as f:
        json.dump(record, f)
    code = sample_judge.main(["--data-dir", demo_root, "--judge", saved_judge, "--samples", samples,
                              "--no-progress", "--threads", "1", "--out", str(tmp_path / "result.json")])
    said = capsys.readouterr().out
    result = json.loads((tmp_path / "result.json").read_text())
    assert code == 0 and result["sampled_by"] == record
    assert sorted(result["samples"]["per_class"]) == [class_name(0), class_name(2)]
    assert result["samples"]["n"] == 4 and result["samples"]["share"] >= 0.75  # not the noise beside them
    assert "4 samples, the 2 per class that" in said and "checkpoint c.pt, seed 9, guidance 1" in said


def test_a_single_sample_is_judged_without_a_frechet_distance(demo_root, saved_judge, tmp_path, capsys):
    samples = write_samples(tmp_path / "samples", 1, seed=3)
    for k in (1, 2, 3):
        os.rename(os.path.join(samples, class_name(k)), tmp_path / f"elsewhere{k}")
    code, result = judge(capsys, "--data-dir", demo_root, "--judge", saved_judge, "--samples", samples)
    assert code == 0 and result["samples"]["n"] == 1 and "frechet" not in result


def test_augment_mirrors_half_the_images_and_shifts_them():
    x = torch.rand(64, 3, 10, 10)
    out = sample_judge.augment(x, torch.Generator().manual_seed(0))
    s = sample_judge.SHIFT
    seen = []  # (mirrored, dy, dx) of each image
    for image, augmented in zip(x, out):
        padded = [torch.nn.functional.pad(v[None], (s,) * 4, mode="replicate")[0] for v in (image, image.flip(-1))]
        views = [(m, dy, dx) for m in (0, 1) for dy in range(2 * s + 1) for dx in range(2 * s + 1)]
        seen += [v for v in views if torch.equal(augmented, padded[v[0]][:, v[1]:v[1] + 10, v[2]:v[2] + 10])]
    assert len(seen) == len(x)  # each image is exactly one mirror and shift of itself
    assert 16 < sum(m for m, _, _ in seen) < 48  # about half mirrored
    assert len({(dy, dx) for _, dy, dx in seen}) > (2 * s + 1) ** 2 // 2  # most shifts drawn
    flat = torch.full((2, 3, 10, 10), 0.25)
    assert torch.equal(sample_judge.augment(flat, torch.Generator().manual_seed(1)), flat)


def bad_cases(demo_root, saved_judge, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a judge")
    empty = tmp_path / "empty"
    empty.mkdir()
    unconditional = write_samples(tmp_path / "unconditional", 1, seed=0)  # older ClassK/ folders, then
    (tmp_path / "unconditional" / "samples.json").write_text('{"classes": [null], "n_per_class": 1}')
    stopped = write_samples(tmp_path / "stopped", 1, seed=0)
    (tmp_path / "stopped" / "samples.json").write_text('{"classes": [0], "n_per_class": 2}')
    return {
        "--epochs must be >= 1": ["--epochs", "0"],
        "--threads must be >= 1": ["--threads", "0"],
        "drop --save-judge": ["--judge", saved_judge, "--save-judge", str(tmp_path / "j.pt")],
        "--judge: file not found": ["--judge", str(tmp_path / "missing.pt")],
        "not a judge saved by --save-judge": ["--judge", str(corrupt)],
        "--samples: folder not found": ["--samples", str(tmp_path / "missing")],
        "the layout of sample.py --out-dir": ["--samples", str(empty)],
        "records an unconditional model's samples": ["--samples", unconditional],
        "0000.png: missing (2 of the 2 images of Class0": ["--samples", stopped],
        f"--save-judge {tmp_path} is a directory": ["--save-judge", str(tmp_path)],
        f"--out {corrupt / 'result.json'}: {corrupt} is a file": ["--out", str(corrupt / "result.json")],
        "is the same file as --save-judge": ["--save-judge", str(tmp_path / "result.json")],
    }


def test_bad_inputs_exit_2_with_one_line(demo_root, saved_judge, tmp_path, capsys):
    for message, argv in bad_cases(demo_root, saved_judge, tmp_path).items():
        out = tmp_path / "result.json"
        code = sample_judge.main(["--data-dir", demo_root, "--no-progress", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists()


def test_the_training_split_never_holds_a_validation_image(demo_root):
    (train_images, train_labels), (val_images, val_labels) = sample_judge.read_cpen455(demo_root, progress=False)
    assert len(train_labels) + len(val_labels) == 4 * 40 and len(val_labels) == 4 * 4  # 10%, stratified
    assert torch.bincount(val_labels).tolist() == [4, 4, 4, 4]
    train_flat = train_images.flatten(1)
    assert not any((train_flat == v).all(1).any() for v in val_images.flatten(1))  # disjoint


def first_pixel_level(x):
    """[B, 3, H, W] in [-1, 1] -> the grey level 0..255 of each image's first pixel [B]."""
    return torch.round((x[:, 0, 0, 0] + 1) * 127.5).long()


class FirstPixelJudge(torch.nn.Module):
    """Predicts the class written in each image's first pixel (images hold their prediction)."""
    def forward(self, x):
        return torch.nn.functional.one_hot(first_pixel_level(x), 4).float()


def images_holding(values):
    """32x32 images, each of one grey level from `values`."""
    return torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 32, 32).contiguous()


def test_judge_set_counts_per_class_by_hand(capsys):
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    result = sample_judge.judge_set(FirstPixelJudge(), images_holding([0, 1, 0, 1, 1, 0]), labels)
    assert (result["correct"], result["n"], result["share"]) == (4, 6, 4 / 6)
    assert result["per_class"] == {
        class_name(0): {"correct": 2, "n": 3, "share": 2 / 3, "labelled_as": [2, 1, 0, 0]},
        class_name(1): {"correct": 2, "n": 2, "share": 1.0, "labelled_as": [0, 2, 0, 0]},
        class_name(2): {"correct": 0, "n": 1, "share": 0.0, "labelled_as": [1, 0, 0, 0]}}
    samples = sample_judge.judge_set(FirstPixelJudge(), images_holding([0, 3, 1, 1]), torch.tensor([0, 0, 1, 1]))
    sample_judge.print_table({"validation": result, "samples": samples})
    out = capsys.readouterr().out
    assert f"| {class_name(0)} | 66.7% (2/3) | 50.0% (1/2) |" in out
    assert f"| {class_name(2)} | 0.0% (0/1) | - |" in out
    assert "| all | 66.7% (4/6) | 75.0% (3/4) |" in out


def test_training_augments_every_batch_and_keeps_each_image_with_its_label(monkeypatch):
    images = torch.arange(70, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 32, 32).contiguous()
    labels = torch.arange(70) % 4  # image i holds pixel value i and label i % 4
    seen_images, seen_targets = [], []

    def spy_augment(x, generator):
        seen_images.append(x)
        return x

    cross_entropy = torch.nn.functional.cross_entropy

    def spy_cross_entropy(logits, target, *a, **k):
        seen_targets.append(target)
        return cross_entropy(logits, target, *a, **k)

    monkeypatch.setattr(sample_judge, "augment", spy_augment)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy_cross_entropy)
    sample_judge.train_judge(images, labels, epochs=1, seed=0, no_progress=True)
    assert len(seen_images) == len(seen_targets) == 2  # 70 images, batches of 64: every step augmented
    for x, target in zip(seen_images, seen_targets):
        assert torch.equal(first_pixel_level(x) % 4, target)
    assert sorted(torch.cat([first_pixel_level(x) for x in seen_images]).tolist()) == list(range(70))


def test_the_frechet_floor_takes_as_many_training_images_as_samples(monkeypatch):
    # its features (what comes before the last layer) are the channel means
    judge = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    train, val = images_holding(range(0, 20)), images_holding(range(100, 110))
    samples = images_holding(range(200, 205))
    calls = []
    monkeypatch.setattr(sample_judge.fid, "fid_from_features", lambda a, b: calls.append((a, b)) or 0.0)
    result = sample_judge.frechet_to_validation(judge, samples, train, val, seed=0)
    assert result["n"] == 5
    (to_samples, val_a), (to_training, val_b) = calls
    level = lambda f: np.round((f[:, 0] + 1) * 127.5).astype(int)  # features -> the images' pixel value
    assert sorted(level(val_a)) == sorted(level(val_b)) == list(range(100, 110))
    assert sorted(level(to_samples)) == list(range(200, 205))
    floor = level(to_training)
    assert len(floor) == 5 and len(set(floor)) == 5 and all(0 <= v < 20 for v in floor)  # 5 training images


def test_a_frechet_distance_over_no_more_images_than_features_says_so(capsys):
    judged = {"correct": 3, "n": 4, "share": 0.75, "per_class": {}}
    for n, singular in ((sample_judge.WIDTHS[-1], True), (sample_judge.WIDTHS[-1] + 1, False)):
        sample_judge.print_table({"validation": judged, "samples": judged,
                                  "frechet": {"samples": 4.0, "training_images": 0.3, "n": n}})
        said = capsys.readouterr().out
        assert "random training images 0.30 (the floor)" in said
        assert ("covariance is singular" in said) == singular


def test_augment_draws_every_shift_up_to_shift_each_way():
    rows, cols = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    x = torch.stack([rows, cols, rows * 0]).expand(1000, -1, -1, -1)  # each pixel holds its row and column
    out = sample_judge.augment(x, torch.Generator().manual_seed(0))
    s = sample_judge.SHIFT
    assert {int(v) - 5 for v in out[:, 0, 5, 5]} == set(range(-s, s + 1))  # every vertical shift, both ways
    # columns: shifted from column 5, or from column 4 where the image was mirrored first
    assert {int(v) for v in out[:, 1, 5, 5]} == set(range(5 - s, 5 + s + 1)) | set(range(4 - s, 4 + s + 1))
