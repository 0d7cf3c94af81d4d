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
from dataset import class_name, demo_image, make_demo_dataset  # noqa: E402

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
    return {
        "--epochs must be >= 1": ["--epochs", "0"],
        "--threads must be >= 1": ["--threads", "0"],
        "drop --save-judge": ["--judge", saved_judge, "--save-judge", str(tmp_path / "j.pt")],
        "--judge: file not found": ["--judge", str(tmp_path / "missing.pt")],
        "not a judge saved by --save-judge": ["--judge", str(corrupt)],
        "--samples: folder not found": ["--samples", str(tmp_path / "missing")],
        "the layout of sample.py --out-dir": ["--samples", str(empty)],
        f"--save-judge {tmp_path} is a directory": ["--save-judge", str(tmp_path)],
        f"--out {corrupt / 'result.json'}: {corrupt} is a file": ["--out", str(corrupt / "result.json")],
    }


def test_bad_inputs_exit_2_with_one_line(demo_root, saved_judge, tmp_path, capsys):
    for message, argv in bad_cases(demo_root, saved_judge, tmp_path).items():
        out = tmp_path / "result.json"
        code = sample_judge.main(["--data-dir", demo_root, "--no-progress", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists()
