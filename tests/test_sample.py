"""sample.py, the CLI: the files it writes and their seeding, completion (--complete), bad inputs,
two processes under torchrun, FID through the CLI against a direct computation with a stand-in
feature extractor, the warnings, a local Inception weights file, and missing Inception weights
offline."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from checkpoint import save_checkpoint
from conftest import randomize_label_parameters
from dataset import load_images, read_class_folders
from model import build_model
from sampling import derive_seed, generate
from test_fid import StandIn, features_of_folder, frechet_direct, random_inception_weights, write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

K = 3
SIZE = 8
CONFIG = {"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2, "dropout": 0.0, "num_classes": K,
          "embedding_dim": 4, "block_conditioning": "bias", "image_size": SIZE}


def tiny_model(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    model = build_model(config)
    # the label parameters start at zero: random ones make each class's samples its own
    return randomize_label_parameters(model, std=1.0, seed=seed).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_model()
    raw = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_checkpoint(path, {"model": raw, "ema": model.state_dict(), "config": dict(CONFIG),
                                 "epoch": 0, "step": 0})
    return path, model


def run_main(capsys, *argv, extractor=None):
    rc = sample.main([str(a) for a in argv] + ["--no-progress"], extractor=extractor)
    out, err = capsys.readouterr()
    return rc, out, err


def read_png(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# The command line: files, counts, seeds, classes.

def test_cli_files_counts_and_seed(ckpt, tmp_path, capsys):
    path, model = ckpt
    out = tmp_path / "s1"
    rc, stdout, err = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 5,
                               "--batch-size", 2, "--seed", 7, "--sampler", "naive", "--device", "cpu")
    assert rc == 0, err
    names = [f"Class{k}" for k in range(K)]
    assert sorted(os.listdir(out)) == sorted(names + [f"grid_{n}.png" for n in names] + ["samples.json"])
    for n in names:
        assert sorted(os.listdir(out / n)) == [f"{i:04d}.png" for i in range(5)]
        img = Image.open(out / n / "0003.png")
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)  # 8-bit RGB
        assert Image.open(out / f"grid_{n}.png").size == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    # the files are generate()'s images, batch b of class k seeded by derive_seed(seed, k, b)
    first_two = generate(model, torch.tensor([1, 1]), "naive", seed=derive_seed(7, 1, 0))
    assert torch.equal(read_png(out / "Class1" / "0000.png"), first_two[0])
    assert torch.equal(read_png(out / "Class1" / "0001.png"), first_two[1])
    third = generate(model, torch.tensor([1, 1]), "naive", seed=derive_seed(7, 1, 1))  # batch 1, its own seed
    assert torch.equal(read_png(out / "Class1" / "0002.png"), third[0])
    # the EMA weights (the raw ones differ) are the ones used: covered by the equality above

    same = tmp_path / "s2"
    assert run_main(capsys, "--checkpoint", path, "--out-dir", same, "--n-per-class", 5,
                    "--batch-size", 2, "--seed", 7, "--sampler", "naive")[0] == 0
    other = tmp_path / "s3"
    assert run_main(capsys, "--checkpoint", path, "--out-dir", other, "--n-per-class", 5,
                    "--batch-size", 2, "--seed", 8, "--sampler", "naive", "--classes", "2,0")[0] == 0
    assert sorted(os.listdir(other)) == ["Class0", "Class2", "grid_Class0.png", "grid_Class2.png", "samples.json"]
    for n in names:
        for i in range(5):
            assert (out / n / f"{i:04d}.png").read_bytes() == (same / n / f"{i:04d}.png").read_bytes()
    assert not torch.equal(read_png(out / "Class0" / "0000.png"), read_png(other / "Class0" / "0000.png"))

    assert sample.parse_classes("2,0,2", K) == [2, 0]  # each class once, in the order given

    # --classes picks classes without changing their images
    only = tmp_path / "s4"
    assert run_main(capsys, "--checkpoint", path, "--out-dir", only, "--n-per-class", 5,
                    "--batch-size", 2, "--seed", 7, "--sampler", "naive", "--classes", "2")[0] == 0
    assert sorted(os.listdir(only)) == ["Class2", "grid_Class2.png", "samples.json"]
    for i in range(5):
        assert (only / "Class2" / f"{i:04d}.png").read_bytes() == (out / "Class2" / f"{i:04d}.png").read_bytes()


def test_a_later_smaller_run_records_its_images_apart_from_those_left_beside_them(ckpt, tmp_path, capsys):
    path, _ = ckpt
    out = tmp_path / "s"
    assert run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 4, "--seed", 1)[0] == 0
    rc, stdout, _ = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 2, "--seed", 2,
                             "--classes", "1")
    assert rc == 0 and "also holds 2 PNGs from an earlier, larger run" in stdout
    record = json.loads((out / "samples.json").read_text())
    assert record == {"checkpoint": path, "classes": [1], "n_per_class": 2, "seed": 2, "batch_size": None,
                      "sampler": "fast", "guidance": 0.0}
    # what reads the folder (bench/sample_judge.py, --fid-ref) takes this run's two images only
    folders, _ = read_class_folders(str(out), K)
    assert folders == [(1, [str(out / "Class1" / "0000.png"), str(out / "Class1" / "0001.png")])]


def test_a_run_stopped_while_saving_leaves_no_record_of_the_run_before(ckpt, tmp_path, capsys, monkeypatch):
    path, _ = ckpt
    out = tmp_path / "s"
    assert run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 1)[0] == 0
    assert (out / "samples.json").exists()
    save_images = sample.save_images

    def stopped_after_the_first_class(images, out_dir, name):
        if name != "Class0":
            raise KeyboardInterrupt
        return save_images(images, out_dir, name)

    monkeypatch.setattr(sample, "save_images", stopped_after_the_first_class)
    with pytest.raises(KeyboardInterrupt):
        run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 1, "--seed", 3)
    assert not (out / "samples.json").exists()  # Class0 is of the new run, Class1 and Class2 of the old


def test_cli_bad_inputs(ckpt, tmp_path, capsys):
    path, _ = ckpt
    cases = [
        (["--checkpoint", tmp_path / "missing.pt"], "missing.pt"),
        (["--checkpoint", path, "--classes", "0,5"], "--classes"),
        (["--checkpoint", path, "--classes", "a"], "--classes"),
        (["--checkpoint", path, "--n-per-class", 0], "--n-per-class"),
        (["--checkpoint", path, "--guidance", -1], "--guidance"),
        (["--checkpoint", path, "--guidance", "nan"], "--guidance"),
        (["--checkpoint", path, "--guidance", "inf"], "--guidance"),
        (["--checkpoint", path, "--fid-ref", tmp_path / "noref"], "noref"),
    ]
    for argv, needle in cases:
        out = tmp_path / "out"
        rc, _, err = run_main(capsys, *argv, "--out-dir", out, "--sampler", "naive",
                              extractor=StandIn())
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (argv, err)
        assert lines[0].startswith("sample.py: error:")
        assert not out.exists(), "nothing sampled before the inputs are checked"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    rc, _, err = run_main(capsys, "--checkpoint", path, "--out-dir", a_file / "out", extractor=StandIn())
    assert rc == 2 and err.count("\n") == 1 and "is a file, not a folder" in err
    # Where a file of the run is blocked (a file in place of a class folder, a folder in place of
    # a grid), it stops before sampling, not with a traceback after it.
    for blocker, needle in (("Class1", "Class1 is a file, not a folder"), ("grid_Class0.png/", "is a directory")):
        out = tmp_path / f"blocked-{len(needle)}"
        (out / blocker).parent.mkdir(parents=True, exist_ok=True)
        (out / blocker).mkdir() if blocker.endswith("/") else (out / blocker).write_text("mine\n")
        rc, stdout, err = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 1)
        assert rc == 2 and err.count("\n") == 1 and needle in err, err
        assert sorted(os.listdir(out)) == [blocker.rstrip("/")]


def test_cli_guidance_draws_the_guided_images_and_needs_labels(ckpt, tmp_path, capsys):
    path, model = ckpt
    out = tmp_path / "guided"
    rc, stdout, _ = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--classes", "1",
                             "--n-per-class", 2, "--seed", 7, "--guidance", 1.5)
    assert rc == 0 and "guidance 1.5" in stdout
    expected = generate(model, torch.tensor([1, 1]), "fast", seed=derive_seed(7, 1, 0), guidance=1.5)
    assert torch.equal(torch.stack([read_png(out / "Class1" / f"000{i}.png") for i in range(2)]), expected)

    unconditional = dict(CONFIG, num_classes=0, embedding_dim=0, block_conditioning="none")
    plain = str(tmp_path / "plain.pt")
    state = tiny_model(unconditional).state_dict()
    save_checkpoint(plain, {"model": state, "ema": state, "config": unconditional, "epoch": 0, "step": 0})
    rc, _, err = run_main(capsys, "--checkpoint", plain, "--out-dir", tmp_path / "no", "--guidance", 1)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error: --guidance")


# ---------------------------------------------------------------------------------------------
# Completion.

def write_images(folder, names, size=(16, 16), seed=0):
    """Random RGB images (16x16: resized to the model's 8x8) under `folder`."""
    rng = np.random.RandomState(seed)
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(folder, name))


def grid_cells(path, columns):
    """A grid PNG (padding 2) -> uint8 cells [rows, columns, 3, SIZE, SIZE]."""
    grid = read_png(path)
    rows = (grid.shape[1] - 2) // (SIZE + 2)
    return torch.stack([torch.stack([grid[:, 2 + r * (SIZE + 2):2 + r * (SIZE + 2) + SIZE,
                                          2 + c * (SIZE + 2):2 + c * (SIZE + 2) + SIZE]
                                     for c in range(columns)]) for r in range(rows)])


def test_complete_writes_a_grid_per_image(ckpt, tmp_path, capsys):
    """Two images, 2 completions each under every label, batches of 3: a grid per image (rows:
    completions; columns: original, kept rows, Class0..2) and one of all; the kept rows bit for
    bit; each batch is generate()'s, seeded by derive_seed(seed, k, batch)."""
    path, model = ckpt
    images = tmp_path / "images"
    write_images(images, ["a.png", "sub/b.jpg"])
    out = tmp_path / "out"
    argv = ["--checkpoint", path, "--complete", images, "--keep-rows", 3, "--n-per-class", 2,
            "--batch-size", 3, "--seed", 5]
    rc, stdout, err = run_main(capsys, *argv, "--out-dir", out)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["completions", "grid_completions.png"]
    given = load_images([images / "a.png", images / "sub" / "b.jpg"], SIZE)
    a, b = grid_cells(out / "completions" / "a.png", 5), grid_cells(out / "completions" / "sub" / "b.png", 5)
    assert a.shape == b.shape == (2, 5, 3, SIZE, SIZE)
    assert torch.equal(grid_cells(out / "grid_completions.png", 5), torch.cat([a, b]))
    assert torch.equal(a[0, 0], given[0]) and torch.equal(b[0, 0], given[1])
    assert torch.equal(a[0, 1, :, :3], given[0, :, :3]) and (a[0, 1, :, 3:] == 128).all()
    assert (a[1, :2] == 0).all()  # the original and the kept rows in the first row only
    for cells, image in ((a, given[0]), (b, given[1])):
        assert torch.equal(cells[:, 2:, :, :3], image[:, :3].expand(2, K, -1, -1, -1))  # bit for bit
    # Class1's completions: items (a, a, b) in batch 0, (b) in batch 1
    first = generate(model, torch.tensor([1, 1, 1]), "fast", seed=derive_seed(5, 1, 0),
                     given=given[[0, 0, 1]], keep_rows=3)
    assert torch.equal(torch.stack([a[0, 3], a[1, 3], b[0, 3]]), first)
    assert not torch.equal(a[0, 3], a[1, 3])  # two completions, not one twice
    assert not torch.equal(a[0, 2], a[0, 3])  # each label its own

    again = tmp_path / "again"
    assert run_main(capsys, *argv, "--out-dir", again)[0] == 0
    assert (again / "grid_completions.png").read_bytes() == (out / "grid_completions.png").read_bytes()


def test_complete_bad_inputs(ckpt, tmp_path, capsys):
    path, _ = ckpt
    write_images(tmp_path / "good", ["a.png"])
    write_images(tmp_path / "wide", ["a.png"])
    write_images(tmp_path / "wide", ["wide.png"], size=(16, 8))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    cases = [
        (["--complete", tmp_path / "broken"], "bad.png"),
        (["--complete", tmp_path / "wide"], "wide.png"),
        (["--complete", tmp_path / "absent"], "absent"),
        (["--complete", tmp_path / "good", "--keep-rows", 0], "--keep-rows 0"),
        (["--complete", tmp_path / "good", "--keep-rows", SIZE], f"--keep-rows {SIZE}"),
        (["--keep-rows", 2], "--keep-rows"),
    ]
    for argv, needle in cases:
        out = tmp_path / "out"
        rc, _, err = run_main(capsys, "--checkpoint", path, *argv, "--out-dir", out)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (argv, err)
        assert not out.exists(), "nothing sampled before the inputs are checked"
    rc, _, err = run_main(capsys, "--checkpoint", path, "--complete", tmp_path / "good",
                          "--out-dir", tmp_path / "good" / "done")  # the completions would join the images
    assert rc == 2 and "is inside --complete" in err and sorted(os.listdir(tmp_path / "good")) == ["a.png"]


# ---------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo on the CPU).

def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample.py"), *map(str, argv), "--no-progress", "--device", "cpu"]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)


def files_of(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_torchrun_two_processes_write_the_files_of_one(ckpt, tmp_path, capsys):
    """Samples (3 classes x 2 batches) and completions (3 labels x 2 batches), each shared out
    between two processes: the same files, byte for byte, as one process writes; rank 0 alone
    prints."""
    path, _ = ckpt
    write_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    runs = {"samples": ["--n-per-class", 3, "--batch-size", 2],
            "completions": ["--complete", tmp_path / "images", "--batch-size", 2]}
    for name, argv in runs.items():
        argv = ["--checkpoint", path, "--seed", 3, *argv]
        result = torchrun(*argv, "--out-dir", tmp_path / f"two_{name}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("sample.py:") == 2  # the first and the last line, once each
        assert run_main(capsys, *argv, "--out-dir", tmp_path / f"one_{name}")[0] == 0
        one, two = files_of(tmp_path / f"one_{name}"), files_of(tmp_path / f"two_{name}")
        assert len(one) > 3 and one == two


def test_torchrun_a_failure_on_one_rank_stops_all(ckpt, tmp_path):
    """FID is set up on rank 0 alone; its error stops both processes before any sampling: one
    line, a non-zero exit, no output folder."""
    path, _ = ckpt
    result = torchrun("--checkpoint", path, "--out-dir", tmp_path / "out", "--fid-ref", tmp_path,
                      "--fid-weights", tmp_path / "absent.pth")
    errors = [line for line in result.stderr.splitlines() if line.startswith("sample.py: error:")]
    assert result.returncode != 0 and len(errors) == 1 and "absent.pth" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# FID through the command line.

def test_cli_fid_per_class_against_direct(ckpt, tmp_path, capsys):
    """FID through the CLI with the stand-in extractor and a reference folder of ClassK/ folders:
    pooled and per-class scores equal the direct Frechet distance of the stand-in features of the
    written PNGs and of the (resized) reference images."""
    path, _ = ckpt
    ref = tmp_path / "ref"
    for k, n in enumerate([3, 8, 8]):
        write_folder(ref / f"Class{k}", n, seed=10 + k, base=60 + 60 * k)
    out = tmp_path / "samples"
    extractor = StandIn()
    rc, stdout, err = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 6,
                               "--sampler", "naive", "--fid-ref", ref, extractor=extractor)
    assert rc == 0, err
    fid = json.loads((out / "fid.json").read_text())["results"]
    assert set(fid) == {"pooled", "Class0", "Class1", "Class2"}
    gen = {k: features_of_folder(out / f"Class{k}", extractor) for k in range(K)}
    refs = {k: features_of_folder(ref / f"Class{k}", extractor) for k in range(K)}
    pooled = frechet_direct(np.concatenate(list(gen.values())), np.concatenate(list(refs.values())))
    assert fid["pooled"]["fid"] == pytest.approx(pooled, rel=1e-5)
    assert (fid["pooled"]["n_generated"], fid["pooled"]["n_reference"]) == (18, 19)
    for k in (1, 2):
        assert fid[f"Class{k}"]["fid"] == pytest.approx(frechet_direct(gen[k], refs[k]), rel=1e-5)
    warning = [line for line in err.splitlines() if "singular" in line]
    assert len(warning) == 1 and "Class0 (6 generated, 3 reference)" in warning[0]
    assert "pooled" not in warning[0] and "Class1" not in warning[0]
    assert "FID pooled" in stdout
    # a later run into the folder without --fid-ref keeps fid.json, and says it scores other images
    scores = (out / "fid.json").read_bytes()
    rc, stdout, _ = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--n-per-class", 1, "--seed", 4)
    assert rc == 0 and (out / "fid.json").read_bytes() == scores
    assert f"note: {out / 'fid.json'} scores an earlier run's images, not these" in stdout


# ---------------------------------------------------------------------------------------------
# Inception weights.

def test_missing_weights_offline_in_process(ckpt, tmp_path, capsys, monkeypatch):
    path, _ = ckpt
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    write_folder(tmp_path / "ref", 4, seed=0, base=100)
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--sampler", "naive",
                          "--fid-ref", tmp_path / "ref")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "--fid-weights" in lines[0] and "http" in lines[0]
    assert not out.exists()


def test_missing_weights_offline_subprocess(ckpt, tmp_path):
    """The real CLI with an empty torch home and no route to the internet (a dead proxy): one
    stderr line that says how to supply the weights, exit code 2, no traceback."""
    path, _ = ckpt
    write_folder(tmp_path / "ref", 4, seed=0, base=100)
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "th"),
           "https_proxy": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "HTTP_PROXY": dead}
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", path,
                             "--out-dir", str(tmp_path / "out"), "--sampler", "naive",
                             "--fid-ref", str(tmp_path / "ref")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "--fid-weights" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_fid_weights_file_real_inception(ckpt, tmp_path, capsys):
    """--fid-weights loads a local state_dict into pytorch-fid's InceptionV3 (here random weights
    of the right shapes, 64 dims) with no download; a file that is not such weights fails cleanly."""
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_weights(), weights)
    path, _ = ckpt
    ref = tmp_path / "ref"
    write_folder(ref, 5, seed=0, base=100)
    out = tmp_path / "out"
    rc, stdout, err = run_main(capsys, "--checkpoint", path, "--out-dir", out, "--sampler", "naive",
                               "--n-per-class", 3, "--classes", "1", "--fid-ref", ref,
                               "--fid-dims", 64, "--fid-weights", weights)
    assert rc == 0, err
    fid = json.loads((out / "fid.json").read_text())
    assert fid["fid_dims"] == 64 and np.isfinite(fid["results"]["pooled"]["fid"])
    assert "singular" in err  # 3 and 5 images for 64 dims

    bogus = tmp_path / "bogus.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bogus)
    for bad, needle in ((bogus, "bogus.pth"), (tmp_path / "absent.pth", "absent.pth")):
        rc, _, err = run_main(capsys, "--checkpoint", path, "--out-dir", tmp_path / "o2", "--sampler", "naive",
                              "--fid-ref", ref, "--fid-dims", 64, "--fid-weights", bad)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], err
