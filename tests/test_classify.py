"""classify.py: CSV shape and order on both input kinds, metrics against numbers computed by hand,
the prior, and every bad input (exit code 2, one stderr line, no CSV left)."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import classify
import utils
from checkpoint import load_checkpoint, save_checkpoint
from dataset import load_images, make_demo_dataset, to_model_input
from model import build_model

K = 3
SIZE = 8
CONFIG = {"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2, "dropout": 0.0, "num_classes": K,
          "embedding_dim": 4, "block_conditioning": "bias", "image_size": SIZE}


def class_images(labels, seed, size=SIZE):
    """uint8 [N, 3, size, size]: class k is a flat colour with channel k bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    x = torch.full((len(labels), 3, size, size), 50.0)
    x[torch.arange(len(labels)), labels] = 200.0
    x = x + 12 * torch.randn(x.shape, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny conditional model trained for a few steps; its checkpoint has distinct EMA and raw
    weights (the EMA ones are the trained ones) so that tests see which are used."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for step in range(40):
        labels = torch.arange(24) % K
        x = to_model_input(class_images(labels, seed=step))
        loss = utils.discretized_mix_logistic_nll(x, model(x, labels)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    raw = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ema.items()}
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_checkpoint(path, {"model": raw, "ema": ema, "config": dict(CONFIG), "epoch": 3, "step": 40})
    return path, model


def write_image(path, array_chw, size=16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array_chw.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
    img.save(path)


@pytest.fixture(scope="module")
def cpen_root(tmp_path_factory):
    """A CPEN455-layout root: 16x16 JPEGs, train.csv with labels, test.csv with -1, no header, CRLF.
    train.csv has no class-2 rows (a prior that rules class 2 out)."""
    root = tmp_path_factory.mktemp("cpen455")
    train_labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 1]  # the images
    csv_labels = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1]    # what train.csv claims: no class 2
    rows = []
    images = class_images(train_labels, seed=100)
    for i, label in enumerate(csv_labels):
        item = f"train/{i + 1:07d}.jpg"
        write_image(str(root / item), images[i])
        rows.append(f"{item},{label}\r\n")
    (root / "train.csv").write_bytes("".join(rows).encode())
    # a labelled split whose labels are the true ones: for metrics
    val_labels = [0, 1, 2, 2, 1, 0, 0, 2, 1]
    images = class_images(val_labels, seed=200)
    rows = []
    for i, label in enumerate(val_labels):
        item = f"val/{i + 1:07d}.jpg"
        write_image(str(root / item), images[i])
        rows.append(f"{item},{label}\r\n")
    (root / "val.csv").write_bytes("".join(rows).encode())
    test_labels = [2, 0, 1, 1, 2]
    images = class_images(test_labels, seed=300)
    rows = []
    for i in range(len(test_labels)):
        item = f"test/{(i + 1) * 7:07d}.jpg"
        write_image(str(root / item), images[i])
        rows.append(f"{item},-1\r\n")
    (root / "test.csv").write_bytes("".join(rows).encode())
    return root


def run_main(capsys, *argv):
    rc = classify.main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def csv_ids(path):
    with open(path, newline="") as f:
        return [row[0] for row in csv.reader(f) if row]


def softmax(a):
    a = a - a.max(axis=1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=1, keepdims=True)


EXPECTED_HEADER = (["id", "label"] + [f"loglik_Class{k}" for k in range(K)]
                   + [f"posterior_Class{k}" for k in range(K)])


def test_cpen455_layout_csv_and_metrics_by_hand(trained, cpen_root, tmp_path, capsys):
    ckpt, model = trained
    out, logits_path, metrics_path = tmp_path / "pred.csv", tmp_path / "ll.npy", tmp_path / "m.json"
    rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val",
                               "--out", out, "--logits", logits_path, "--metrics-out", metrics_path,
                               "--batch-size", 4)
    assert rc == 0, err
    header, rows = read_csv(out)
    assert header == EXPECTED_HEADER
    assert [r[0] for r in rows] == csv_ids(cpen_root / "val.csv")  # exactly as listed, in order
    assert all(len(r) == 2 + 2 * K for r in rows)

    logits = np.load(logits_path)
    assert logits.shape == (len(rows), K)
    # the logits are the EMA model's log p(x|c) on the resized images
    files = [str(cpen_root / r[0]) for r in rows]
    with torch.no_grad():
        direct = utils.class_log_likelihoods(model, to_model_input(load_images(files, SIZE)), K)
    np.testing.assert_allclose(logits, direct.double().numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.array([[float(v) for v in r[2:2 + K]] for r in rows]), logits,
                               rtol=1e-8, atol=1e-6)
    post = np.array([[float(v) for v in r[2 + K:]] for r in rows])
    np.testing.assert_allclose(post, softmax(logits), rtol=1e-4, atol=1e-6)
    pred = np.array([int(r[1]) for r in rows])
    np.testing.assert_array_equal(pred, logits.argmax(axis=1))

    # metrics by hand
    true = np.array([int(l.split(",")[1]) for l in (cpen_root / "val.csv").read_text().split()])
    n = len(true)
    cm = [[sum(1 for t, p in zip(true, pred) if t == i and p == j) for j in range(K)] for i in range(K)]
    acc = sum(cm[i][i] for i in range(K)) / n
    per_class = [cm[i][i] / sum(cm[i]) for i in range(K)]
    f1s = []
    for k in range(K):
        tp = cm[k][k]
        fp = sum(cm[i][k] for i in range(K)) - tp
        fn = sum(cm[k]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    bpd = np.mean([-logits[i, true[i]] for i in range(n)]) / (3 * SIZE * SIZE * math.log(2))

    metrics = json.loads(metrics_path.read_text())
    assert metrics["confusion_matrix"] == cm
    assert metrics["n"] == n
    assert metrics["accuracy"] == pytest.approx(acc)
    assert metrics["accuracy_standard_error"] == pytest.approx(math.sqrt(acc * (1 - acc) / n))
    assert 0 < metrics["ece_standard_error"] < 1
    assert metrics["per_class_accuracy"] == pytest.approx(per_class)
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1s))
    assert metrics["bits_per_dim"] == pytest.approx(bpd, rel=1e-9)
    assert acc > 0.5  # the tiny model did learn the colours
    assert f"accuracy {acc:.4f}" in stdout and "macro F1" in stdout and "confusion matrix" in stdout
    assert "images/s" in stdout.strip().splitlines()[-1]


def test_unlabelled_split_writes_no_metrics(trained, cpen_root, tmp_path, capsys):
    ckpt, _ = trained
    out, metrics_path = tmp_path / "pred.csv", tmp_path / "m.json"
    rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root,
                               "--out", out, "--metrics-out", metrics_path)  # default split test
    assert rc == 0, err
    header, rows = read_csv(out)
    assert header == EXPECTED_HEADER
    assert [r[0] for r in rows] == csv_ids(cpen_root / "test.csv")
    assert not metrics_path.exists() and "accuracy" not in stdout


def test_plain_folder_recursive_sorted(trained, tmp_path, capsys):
    ckpt, _ = trained
    folder = tmp_path / "imgs"
    images = class_images([0, 1, 2, 0, 1], seed=5)
    names = ["b.png", "a.jpg", "sub/z.png", "sub/deeper/c.JPG", "0.png"]
    for name, img in zip(names, images):
        write_image(str(folder / name), img)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out" / "pred.csv"  # parent created
    rc, _, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", folder, "--out", out)
    assert rc == 0, err
    header, rows = read_csv(out)
    assert header == EXPECTED_HEADER
    assert [r[0] for r in rows] == sorted(names)


def test_csv_subset_keeps_its_order(trained, cpen_root, tmp_path, capsys):
    ckpt, _ = trained
    subset = tmp_path / "subset.csv"  # header, LF line ends, ids relative to the root
    ids = csv_ids(cpen_root / "val.csv")
    chosen = [ids[5], ids[0], ids[3]]
    labels = [0, 0, 2]
    subset.write_text("id,label\n" + "".join(f"{i},{l}\n" for i, l in zip(chosen, labels)))
    out, logits_path = tmp_path / "pred.csv", tmp_path / "ll.npy"
    rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", subset,
                               "--out", out, "--logits", logits_path)
    assert rc == 0, err
    _, rows = read_csv(out)
    assert [r[0] for r in rows] == chosen
    assert np.load(logits_path).shape == (3, K)
    assert "accuracy" in stdout


def test_a_repeated_image_is_scored_once_a_row_and_said_so(trained, cpen_root, tmp_path, capsys):
    ckpt, _ = trained
    first = csv_ids(cpen_root / "val.csv")[0]
    twice = tmp_path / "twice.csv"
    twice.write_text(f"{first},0\n{first},0\n")
    rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", twice,
                               "--out", tmp_path / "p.csv")
    assert rc == 0, err
    assert "2 images from" in stdout
    assert "(1 of them repeat an image listed before: each is scored and counted)" in stdout
    assert [row[0] for row in read_csv(tmp_path / "p.csv")[1]] == [first, first]


def test_its_own_output_is_refused_as_labels(trained, cpen_root, tmp_path, capsys):
    """A predictions CSV holds predicted labels: as --csv, the metrics would score it against itself."""
    ckpt, _ = trained
    predictions = tmp_path / "pred.csv"
    assert run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val", "--out", predictions)[0] == 0
    rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", predictions,
                               "--out", tmp_path / "again.csv")
    assert rc == 2 and "predicted labels" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "again.csv").exists()


def test_outputs_never_land_on_the_inputs(trained, cpen_root, tmp_path, capsys):
    ckpt, _ = trained
    labels = tmp_path / "labels.csv"
    labels.write_text((cpen_root / "val.csv").read_text())
    folder = tmp_path / "plain"
    write_image(str(folder / "a.png"), class_images([1], seed=2)[0])
    image_bytes, checkpoint_bytes = (folder / "a.png").read_bytes(), open(ckpt, "rb").read()
    cases = [(["--data-dir", cpen_root, "--csv", labels, "--out", labels], "is the same file as --csv"),
             (["--data-dir", cpen_root, "--csv", labels, "--out", tmp_path / "p.csv", "--logits", ckpt],
              "is the same file as --checkpoint"),
             (["--data-dir", cpen_root, "--csv", labels, "--out", tmp_path / "p.csv", "--metrics-out", tmp_path / "m.png"],
              "the same file as --metrics-out"),  # the diagram, m.png, would replace the JSON
             (["--data-dir", folder, "--out", tmp_path / "p.csv", "--explain", folder], "would overwrite the image"),
             (["--data-dir", folder, "--out", tmp_path / "p.csv", "--explain", tmp_path / "maps"],
              "maps/a.png is a directory")]  # stopped before scoring, not after
    (tmp_path / "maps" / "a.png").mkdir(parents=True)
    for argv, needle in cases:
        rc, _, err = run_main(capsys, "--checkpoint", ckpt, *argv)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (needle, err)
    assert labels.read_text() == (cpen_root / "val.csv").read_text()
    assert (folder / "a.png").read_bytes() == image_bytes and not (tmp_path / "p.csv").exists()
    assert open(ckpt, "rb").read() == checkpoint_bytes


def test_train_prior(trained, cpen_root, tmp_path, capsys):
    """train.csv has classes 0 and 1 only (6 rows each): with --prior train, class 2 is never
    predicted, and predictions and posteriors follow log p(x|c) + log(count_c / 12) by hand."""
    ckpt, _ = trained
    paths = {}
    for prior in ("uniform", "train"):
        paths[prior] = (tmp_path / f"{prior}.csv", tmp_path / f"{prior}.npy")
        rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val",
                                   "--out", paths[prior][0], "--logits", paths[prior][1], "--prior", prior)
        assert rc == 0, err
    logits = np.load(paths["train"][1])
    np.testing.assert_allclose(logits, np.load(paths["uniform"][1]))
    _, rows_u = read_csv(paths["uniform"][0])
    _, rows_t = read_csv(paths["train"][0])
    pred_u = np.array([int(r[1]) for r in rows_u])
    pred_t = np.array([int(r[1]) for r in rows_t])
    assert (pred_u == 2).any(), "the uniform prior predicts class 2 for the class-2 images"
    assert not (pred_t == 2).any()
    with np.errstate(divide="ignore"):
        log_prior = np.log(np.array([6, 6, 0]) / 12)
    np.testing.assert_array_equal(pred_t, (logits + log_prior).argmax(axis=1))
    post_t = np.array([[float(v) for v in r[2 + K:]] for r in rows_t])
    finite = softmax(logits[:, :2] + log_prior[:2])
    np.testing.assert_allclose(post_t[:, :2], finite, rtol=1e-4, atol=1e-6)
    assert (post_t[:, 2] == 0).all()


def test_hflip_classifies_by_the_mean_of_the_image_and_its_mirror(trained, cpen_root, tmp_path, capsys):
    ckpt, model = trained
    out, logits_path, metrics_path = tmp_path / "pred.csv", tmp_path / "ll.npy", tmp_path / "m.json"
    rc, _, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val",
                          "--out", out, "--logits", logits_path, "--metrics-out", metrics_path, "--hflip")
    assert rc == 0, err
    _, rows = read_csv(out)
    images = to_model_input(load_images([str(cpen_root / r[0]) for r in rows], SIZE))
    with torch.no_grad():
        as_given = utils.class_log_likelihoods(model, images, K).double().numpy()
        mirrored = utils.class_log_likelihoods(model, images.flip(-1), K).double().numpy()
    assert np.abs(as_given - mirrored).max() > 1e-3  # the noisy images are not symmetric
    scores = np.load(logits_path)
    np.testing.assert_allclose(scores, (as_given + mirrored) / 2, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal([int(r[1]) for r in rows], scores.argmax(axis=1))
    true = np.array([int(l.split(",")[1]) for l in (cpen_root / "val.csv").read_text().split()])
    metrics = json.loads(metrics_path.read_text())
    assert metrics["hflip"] is True
    bpd = -as_given[np.arange(len(true)), true].mean() / (3 * SIZE * SIZE * math.log(2))
    assert metrics["bits_per_dim"] == pytest.approx(bpd, rel=1e-5)  # of the images as given


def test_pure_metrics_functions():
    cm = classify.confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 0], 4)
    assert cm.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    m = classify.metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["accuracy_standard_error"] == pytest.approx(math.sqrt(0.5 * 0.5 / 6))
    assert m["per_class_accuracy"] == [0.5, pytest.approx(2 / 3), 0.0, None]
    # F1: class 0: tp 1, fp 2, fn 1 -> 2/5; class 1: tp 2, fp 1, fn 1 -> 4/6; class 2: 0; class 3 absent
    assert m["macro_f1"] == pytest.approx((2 / 5 + 4 / 6 + 0) / 3)
    lp = classify.log_prior_from_labels([0, 0, 0, 1, -1], 3)
    np.testing.assert_allclose(np.exp(lp), [0.75, 0.25, 0.0])
    ranking, post = classify.rank_labels(np.array([[-10.0, -11.0, -30.0]]), np.log([0.1, 0.9, 1e-300]))
    assert ranking.tolist() == [[1, 0, 2]]  # the prediction, the runner-up, the rest
    np.testing.assert_allclose(post.sum(), 1.0)


# ---------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, exactly one stderr line, no CSV.

def bad_input_cases(trained, cpen_root, tmp_path):
    ckpt, _ = trained
    cases = {}
    cases["missing checkpoint"] = (["--checkpoint", tmp_path / "nope.pt", "--data-dir", cpen_root], "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    cases["foreign checkpoint"] = (["--checkpoint", foreign, "--data-dir", cpen_root], "foreign.pt")
    text = tmp_path / "text.pt"
    text.write_text("hello")
    cases["text checkpoint"] = (["--checkpoint", text, "--data-dir", cpen_root], "text.pt")
    wrong = tmp_path / "wrong.pt"
    state = torch.load(ckpt, weights_only=True)
    state["config"] = {**state["config"], "nr_filters": 16}  # weights no longer fit
    torch.save(state, wrong)
    cases["mismatched checkpoint"] = (["--checkpoint", wrong, "--data-dir", cpen_root], "wrong.pt")
    corrupt = tmp_path / "corrupt"
    write_image(str(corrupt / "a.png"), class_images([0], seed=1)[0])
    (corrupt / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    cases["corrupt image"] = (["--checkpoint", ckpt, "--data-dir", corrupt, "--batch-size", 1], "b.jpg")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    cases["empty folder"] = (["--checkpoint", ckpt, "--data-dir", empty], "empty")
    cases["missing data dir"] = (["--checkpoint", ckpt, "--data-dir", tmp_path / "absent"], "absent")
    too_many = tmp_path / "labels5.csv"
    too_many.write_text("train/0000001.jpg,0\ntrain/0000002.jpg,5\n")
    cases["label beyond the model"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", too_many],
                                       "labels5.csv")
    bad_label = tmp_path / "badlabel.csv"
    bad_label.write_text("train/0000001.jpg,cat\n")
    cases["non-integer label"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", bad_label],
                                  "badlabel.csv")
    one_column = tmp_path / "onecol.csv"
    one_column.write_text("train/0000001.jpg\n")
    cases["one-column CSV"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", one_column],
                               "onecol.csv")
    missing_file = tmp_path / "missingfile.csv"
    missing_file.write_text("train/9999999.jpg,0\n")
    cases["listed file missing"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", missing_file],
                                    "9999999.jpg")
    cases["missing --csv"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--csv", tmp_path / "x.csv"],
                              "x.csv")
    cases["missing split csv"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "dev"], "dev.csv")
    cases["a split of a plain folder"] = (["--checkpoint", ckpt, "--data-dir", tmp_path / "plain", "--split", "val"],
                                          "--split val:")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    cases["an output inside a file"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--metrics-out",
                                         a_file / "m.json"], "is a file, not a folder")
    cases["train prior without train.csv"] = (["--checkpoint", ckpt, "--data-dir", corrupt.parent / "plain",
                                               "--prior", "train"], "train.csv")
    cases["two ways to choose the images"] = (["--checkpoint", ckpt, "--data-dir", cpen_root, "--held-out", "val",
                                               "--split", "val"], "--split and --held-out")
    cases["a report split the run did not hold out"] = (
        ["--checkpoint", ckpt, "--data-dir", cpen_root, "--held-out", "report"], "held out no report images")
    return cases


def test_bad_inputs_exit_2_one_line_no_csv(trained, cpen_root, tmp_path, capsys):
    plain = tmp_path / "plain"
    write_image(str(plain / "a.png"), class_images([1], seed=2)[0])
    for name, (argv, needle) in bad_input_cases(trained, cpen_root, tmp_path).items():
        out = tmp_path / f"{name.replace(' ', '_')}.csv"
        logits = tmp_path / f"{name.replace(' ', '_')}.npy"
        rc, _, err = run_main(capsys, *argv, "--out", out, "--logits", logits)
        lines = err.strip().splitlines()
        assert rc == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("classify.py: error:"), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert not out.exists() and not logits.exists(), name
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert not leftovers


def test_held_out_scores_what_the_training_run_held_out(tmp_path, capsys):
    """--held-out val and --held-out report give what the run's own splits/*.csv give."""
    import train
    data = make_demo_dataset(str(tmp_path / "demo"), seed=1, n_per_class=8, n_val_per_class=1,
                             n_test_per_class=1, image_size=8)
    run = tmp_path / "run"
    assert train.main(["--nr-resnet", "1", "--nr-filters", "8", "--nr-logistic-mix", "2", "--image-size", "8",
                       "--batch-size", "8", "--samples-per-class", "0", "--wandb", "disabled", "--epochs", "1",
                       "--data-dir", data, "--out-dir", str(run), "--val-split", "nosuch",  # no nosuch.csv: carve
                       "--val-fraction", "0.25", "--report-fraction", "0.25", "--seed", "3"]) == 0
    capsys.readouterr()
    for which, n in (("val", 8), ("report", 8)):  # per class: 2 of 8, then round(1.5) = 2 of the 6 left
        common = ["--checkpoint", run / "last.pt", "--data-dir", data]
        assert run_main(capsys, *common, "--held-out", which, "--out", tmp_path / "held.csv")[0] == 0
        assert run_main(capsys, *common, "--csv", run / "splits" / f"{which}.csv",
                        "--out", tmp_path / "listed.csv")[0] == 0
        assert len(csv_ids(tmp_path / "held.csv")) == n + 1  # and the header
        assert (tmp_path / "held.csv").read_bytes() == (tmp_path / "listed.csv").read_bytes()

    # Another seed with the run's split_seed holds out the same images, so the two score them together
    # as a product of experts; another seed alone holds out other images, and is refused.
    base = ["--nr-resnet", "1", "--nr-filters", "8", "--nr-logistic-mix", "2", "--image-size", "8", "--batch-size", "8",
            "--samples-per-class", "0", "--wandb", "disabled", "--epochs", "1", "--data-dir", data,
            "--val-split", "nosuch", "--val-fraction", "0.25", "--report-fraction", "0.25", "--seed", "4"]
    assert train.main(base + ["--out-dir", str(tmp_path / "twin"), "--split-seed", "3"]) == 0
    assert train.main(base + ["--out-dir", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    for which in ("val", "report"):
        assert (tmp_path / "twin" / "splits" / f"{which}.csv").read_bytes() == \
            (run / "splits" / f"{which}.csv").read_bytes()
    assert (tmp_path / "other" / "splits" / "val.csv").read_bytes() != (run / "splits" / "val.csv").read_bytes()
    rc, out, _ = run_main(capsys, "--checkpoint", run / "last.pt", tmp_path / "twin" / "last.pt", "--data-dir", data,
                          "--held-out", "report", "--out", tmp_path / "experts.csv")
    assert rc == 0 and "2 experts" in out
    rc, _, err = run_main(capsys, "--checkpoint", run / "last.pt", tmp_path / "other" / "last.pt", "--data-dir", data,
                          "--held-out", "report", "--out", tmp_path / "refused.csv")
    assert rc == 2 and "held out different images" in err

    # A final model that also trained on the validation images is scored on the same images, and
    # the figures say that they are training figures there (and only there).
    assert train.main(["--resume", str(run / "last.pt"), "--out-dir", str(tmp_path / "final"), "--epochs", "2",
                       "--train-on-held-out", "val"]) == 0
    capsys.readouterr()
    for which, trained_on in (("val", True), ("report", False)):
        rc, out, _ = run_main(capsys, "--checkpoint", tmp_path / "final" / "last.pt", "--data-dir", data,
                              "--held-out", which, "--out", tmp_path / "final.csv")
        assert rc == 0 and ("run also trained on" in out) == trained_on
        assert csv_ids(tmp_path / "final.csv")[1:] == csv_ids(run / "splits" / f"{which}.csv")
    # So are the figures of a product of experts of which any one trained on them, in either order.
    final = tmp_path / "final" / "last.pt"
    for experts in ((run / "last.pt", final), (final, run / "last.pt")):
        rc, out, _ = run_main(capsys, "--checkpoint", *experts, "--data-dir", data, "--held-out", "val",
                              "--out", tmp_path / "pair.csv")
        assert rc == 0 and f"which {final}'s run also trained on" in out

    # The data root changed since training (a report image left train.csv): the split recomputed
    # from it is not what the run held out, and classify.py says so instead of scoring it.
    first_report_row = (run / "splits" / "report.csv").read_text().splitlines()[0]
    train_csv = tmp_path / "demo" / "train.csv"
    train_csv.write_text("".join(row + "\n" for row in train_csv.read_text().splitlines() if row != first_report_row))
    rc, _, err = run_main(capsys, "--checkpoint", run / "last.pt", "--data-dir", data, "--held-out", "report",
                          "--out", tmp_path / "stale.csv")
    assert rc == 2 and "now gives other images" in err and not (tmp_path / "stale.csv").exists()

    # A checkpoint from before the fingerprint is scored, and says that it could not be checked.
    state = load_checkpoint(str(run / "last.pt"))
    save_checkpoint(str(tmp_path / "old.pt"), {**state, "held_out_digest": None})
    rc, out, _ = run_main(capsys, "--checkpoint", tmp_path / "old.pt", "--data-dir", data, "--held-out", "report",
                          "--out", tmp_path / "old.csv")
    assert rc == 0 and f"(unchecked: {tmp_path / 'old.pt'} predates the fingerprint" in out
    assert f"that run read {data})" in out


def test_unconditional_model_cannot_classify(tmp_path, cpen_root, capsys):
    path = tmp_path / "uncond.pt"
    model = build_model({**CONFIG, "num_classes": 0})
    save_checkpoint(str(path), {"model": model.state_dict(), "ema": None,
                                      "config": {**CONFIG, "num_classes": 0}, "epoch": 0, "step": 0})
    rc, _, err = run_main(capsys, "--checkpoint", path, "--data-dir", cpen_root, "--out", tmp_path / "p.csv")
    assert rc == 2 and "unconditional" in err and len(err.strip().splitlines()) == 1


def run_cli(*argv):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "classify.py"), *map(str, argv)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_subprocess(trained, cpen_root, tmp_path):
    """The real command line: success on the test split; a corrupt image gives exit 2 and exactly
    one stderr line (no traceback), and no CSV."""
    ckpt, _ = trained
    out = tmp_path / "pred.csv"
    result = run_cli("--checkpoint", ckpt, "--data-dir", cpen_root, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in read_csv(out)[1]] == csv_ids(cpen_root / "test.csv")
    assert "images/s" in result.stdout

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out2 = tmp_path / "pred2.csv"
    result = run_cli("--checkpoint", ckpt, "--data-dir", corrupt, "--out", out2)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "x.png" in lines[0] and "Traceback" not in result.stderr
    assert not out2.exists()
    result = run_cli("--checkpoint", ckpt, "--out", out2)  # a bad command line: one line too
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_a_reader_that_stops_early_does_not_stop_the_work(trained, cpen_root, tmp_path):
    """`classify.py ... | head -1`: the reader has gone before the first line (the environment may
    set PYTHONUNBUFFERED); the lines are dropped, and the files are written, without a traceback."""
    ckpt, _ = trained
    out, metrics = tmp_path / "pred.csv", tmp_path / "m.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, os.path.join(ROOT, "classify.py"), "--checkpoint", ckpt, "--data-dir", cpen_root,
               "--csv", cpen_root / "train.csv", "--out", out]
    reader, writer = os.pipe()
    os.close(reader)  # every write to stdout fails with EPIPE
    result = subprocess.run([*command, "--metrics-out", metrics], stdout=writer, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, timeout=300)
    os.close(writer)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert len(read_csv(out)[1]) == 12 and json.loads(metrics.read_text())["n"] == 12
    out.unlink()  # and with no stdout at all (`>&-`)
    result = subprocess.run(command, preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert len(read_csv(out)[1]) == 12


REAL_ROOT = os.path.join(ROOT, "..", "shared", "data", "cpen455")


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_ROOT, "train.csv")), reason="no CPEN455 data")
def test_real_cpen455_subset(tmp_path, capsys):
    """The real data (64x64 JPEGs, a few grayscale, CRLF rows), a few rows through --csv, with an
    untrained 32x32 model: one row per image in CSV order, ids as listed, metrics printed."""
    config = {**CONFIG, "num_classes": 4, "image_size": 32}
    path = tmp_path / "c.pt"
    model = build_model(config)
    save_checkpoint(str(path), {"model": model.state_dict(), "ema": model.state_dict(),
                                      "config": config, "epoch": 0, "step": 0})
    with open(os.path.join(REAL_ROOT, "train.csv"), newline="") as f:
        rows = f.read().split("\r\n")
    chosen = rows[:5] + [r for r in rows if r.startswith("train/0000208.jpg,")]  # 0000208: grayscale
    subset = tmp_path / "subset.csv"
    subset.write_bytes(("\r\n".join(chosen) + "\r\n").encode())
    out = tmp_path / "pred.csv"
    rc, stdout, err = run_main(capsys, "--checkpoint", path, "--data-dir", REAL_ROOT, "--csv", subset,
                               "--out", out, "--prior", "train")
    assert rc == 0, err
    header, got = read_csv(out)
    assert header[:2] == ["id", "label"] and len(header) == 2 + 2 * 4
    assert [r[0] for r in got] == [r.split(",")[0] for r in chosen]
    assert "accuracy" in stdout


def with_temperature(path, temperature, tmp_path):
    """A copy of the checkpoint at `path` with a stored temperature, as train.py writes it."""
    state = torch.load(path, weights_only=True)
    copy = str(tmp_path / f"T{temperature}.pt")
    save_checkpoint(copy, {**state, "temperature": temperature})
    return copy


def test_posteriors_use_the_stored_temperature_and_metrics_say_how_calibrated(trained, cpen_root,
                                                                               tmp_path, capsys):
    """The posterior columns are softmax(log p(x|c) / T) with the checkpoint's T, --temperature
    overrides it; the log-likelihood columns and the labels stay as they were; with labels the
    metrics add ECE, the NLL of the true label and the Brier score, and a reliability PNG."""
    ckpt = with_temperature(trained[0], 7.5, tmp_path)
    true = np.array([int(l.split(",")[1]) for l in (cpen_root / "val.csv").read_text().split()])
    runs = {}
    for name, extra in [("stored", []), ("T=1", ["--temperature", "1"]), ("T=3", ["--temperature", "3"])]:
        out, metrics = tmp_path / f"{name}.csv", tmp_path / f"{name}.json"
        rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val",
                                   "--out", out, "--metrics-out", metrics, *extra)
        assert rc == 0, err
        assert "has no fitted temperature" not in stdout
        _, rows = read_csv(out)
        runs[name] = (np.array([[float(v) for v in r[2:2 + K]] for r in rows]),
                      np.array([[float(v) for v in r[2 + K:]] for r in rows]),
                      [r[1] for r in rows], json.loads(metrics.read_text()))
    logits = runs["stored"][0]
    for name, temperature in [("stored", 7.5), ("T=1", 1.0), ("T=3", 3.0)]:
        loglik, post, labels, metrics = runs[name]
        np.testing.assert_allclose(loglik, logits)  # raw, whatever T
        np.testing.assert_allclose(post, softmax(logits / temperature), rtol=1e-4, atol=1e-6)
        assert labels == runs["T=1"][2]  # a uniform prior: T changes no prediction
        assert metrics["temperature"] == temperature
        exact = softmax(logits / temperature)
        assert metrics["nll"] == pytest.approx(-np.mean(np.log(exact[np.arange(len(true)), true])), rel=1e-4)
        assert metrics["brier"] == pytest.approx(np.mean(((exact - np.eye(K)[true]) ** 2).sum(1)), rel=1e-4)
        assert metrics["ece"] == pytest.approx(utils.calibration_metrics(exact, true)["ece"], rel=1e-4)
        with Image.open(tmp_path / f"{name}.png") as diagram:  # beside the JSON
            assert diagram.size[0] > 300 and diagram.mode == "RGB"


def test_a_checkpoint_without_a_temperature_still_works_and_says_so(trained, cpen_root, tmp_path, capsys):
    rc, stdout, err = run_main(capsys, "--checkpoint", trained[0], "--data-dir", cpen_root, "--split", "val",
                               "--out", tmp_path / "p.csv")
    assert rc == 0, err
    assert "has no fitted temperature (it predates calibration, or its run had no validation split): " \
           "posteriors at T = 1" in stdout
    for bad in ("0", "-2", "inf", "nan"):
        rc, _, err = run_main(capsys, "--checkpoint", trained[0], "--data-dir", cpen_root,
                              "--out", tmp_path / "q.csv", "--temperature", bad)
        assert rc == 2 and "--temperature must be a positive number" in err, (bad, err)
    assert not (tmp_path / "q.csv").exists()


def test_a_stored_temperature_that_is_not_a_positive_number_is_refused(trained, cpen_root, tmp_path, capsys):
    state = load_checkpoint(str(trained[0]))
    for bad in (float("nan"), -5.0, 0.0):
        save_checkpoint(str(tmp_path / "bad.pt"), {**state, "temperature": bad})
        rc, _, err = run_main(capsys, "--checkpoint", tmp_path / "bad.pt", "--data-dir", cpen_root,
                              "--out", tmp_path / "p.csv")
        assert rc == 2 and f"its stored temperature, {bad}, is not a positive number" in err, (bad, err)
        assert run_main(capsys, "--checkpoint", tmp_path / "bad.pt", "--data-dir", cpen_root,
                        "--out", tmp_path / "p.csv", "--temperature", "2")[0] == 0  # overridden: fine


def test_fitted_prior_moves_predictions_by_the_stored_prior_and_temperature(trained, cpen_root, tmp_path, capsys):
    """--prior fitted: predictions and posteriors follow softmax(log p(x|c) / T' + log p(c)) with the
    checkpoint's fitted prior and its own T' (here one that rules class 0 out), and
    --temperature overrides T'; a checkpoint without a fitted prior is refused in one line."""
    state = torch.load(trained[0], weights_only=True)
    log_prior = np.array([-1e4, np.log(0.5), np.log(0.5)])  # class 0 all but ruled out
    ckpt = str(tmp_path / "fitted.pt")
    save_checkpoint(ckpt, {**state, "temperature": 5.0,
                           "fitted_prior": {"temperature": 2.0, "log_prior": log_prior.tolist()}})
    runs = {}
    for name, extra in [("uniform", []), ("fitted", ["--prior", "fitted"]),
                        ("fitted T=1", ["--prior", "fitted", "--temperature", "1"])]:
        out, logits = tmp_path / f"{name}.csv", tmp_path / f"{name}.npy"
        rc, stdout, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val",
                                   "--out", out, "--logits", logits, *extra)
        assert rc == 0, err
        _, rows = read_csv(out)
        runs[name] = np.load(logits), np.array([int(r[1]) for r in rows]), np.array(
            [[float(v) for v in r[2 + K:]] for r in rows])
    logits = runs["uniform"][0]
    assert (runs["uniform"][1] == 0).any() and not (runs["fitted"][1] == 0).any()
    for name, temperature in [("uniform", 5.0), ("fitted", 2.0), ("fitted T=1", 1.0)]:
        prior = 0 if name == "uniform" else log_prior
        np.testing.assert_allclose(runs[name][0], logits)  # the log-likelihoods stay raw
        np.testing.assert_array_equal(runs[name][1], (logits / temperature + prior).argmax(1))
        np.testing.assert_allclose(runs[name][2], softmax(logits / temperature + prior), rtol=1e-4, atol=1e-6)
    rc, _, err = run_main(capsys, "--checkpoint", trained[0], "--data-dir", cpen_root, "--split", "val",
                          "--out", tmp_path / "old.csv", "--prior", "fitted")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "has no fitted prior" in err
    assert not (tmp_path / "old.csv").exists()


# ---------------------------------------------------------------------------------------------
# Evidence maps (--explain): per-pixel terms from the scoring pass, adding up to the CSV.

def csv_log_likelihoods(path):
    _, rows = read_csv(path)
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows]), np.array(
        [[float(v) for v in r[2:2 + K]] for r in rows])


@pytest.mark.parametrize("hflip", [False, True])
def test_explain_maps_add_up_to_the_csv(trained, cpen_root, tmp_path, capsys, hflip):
    """The ratio map sums to log p(x|predicted) - log p(x|runner-up) as the CSV has them (with
    --hflip, the mean over the image and its mirror, as the CSV has too), the bits map to the
    predicted label's NLL in bits; only the first --explain-limit images get maps and PNGs."""
    ckpt, model = trained
    out, maps_path, folder = tmp_path / "pred.csv", tmp_path / "maps.npz", tmp_path / "explain"
    rc, _, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val", "--out", out,
                          "--explain", folder, "--explain-out", maps_path, "--explain-limit", 4,
                          "--batch-size", 3, *(["--hflip"] if hflip else []))
    assert rc == 0, err
    ids, predictions, loglik = csv_log_likelihoods(out)
    maps = np.load(maps_path)
    assert len(maps.files) == 3 * 4
    x = to_model_input(load_images([str(cpen_root / i) for i in ids[:4]], SIZE))
    with torch.no_grad():  # each pixel's terms; a mirror's flipped back onto the pixels they score
        terms = utils.class_pixel_log_likelihoods(model, x, K).double().numpy()  # [4, K, H, W]
        if hflip:
            terms = (terms + utils.class_pixel_log_likelihoods(model, x.flip(-1), K).flip(-1).double().numpy()) / 2
    for i, item_id in enumerate(ids[:4]):
        predicted, runner_up = maps[f"labels/{item_id}"]
        assert predicted == predictions[i] and runner_up == np.argsort(-loglik[i])[1]  # uniform prior
        ratio, bits = maps[f"ratio/{item_id}"], maps[f"bits/{item_id}"]
        np.testing.assert_allclose(ratio, terms[i, predicted] - terms[i, runner_up], atol=1e-4)
        assert ratio.shape == bits.shape == (SIZE, SIZE) and (bits > 0).all()
        assert ratio.sum(dtype=np.float64) == pytest.approx(loglik[i, predicted] - loglik[i, runner_up], abs=1e-4)
        assert bits.sum(dtype=np.float64) == pytest.approx(-loglik[i, predicted] / math.log(2), abs=1e-4)
        with Image.open(folder / (os.path.splitext(item_id)[0] + ".png")) as figure:
            assert figure.mode == "RGB" and figure.size[0] > 3 * SIZE
    assert sorted(os.listdir(folder / "val")) == sorted(os.path.basename(os.path.splitext(i)[0]) + ".png"
                                                         for i in ids[:4])


def test_explain_needs_no_second_forward_pass(trained, cpen_root, tmp_path, capsys, monkeypatch):
    ckpt, model = trained
    calls = []
    score = utils.class_pixel_log_likelihoods
    monkeypatch.setattr(utils, "class_pixel_log_likelihoods", lambda *a: calls.append(1) or score(*a))
    for extra in ([], ["--explain", tmp_path / "explain"]):
        calls.clear()
        rc, _, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val",
                              "--out", tmp_path / "p.csv", "--batch-size", 4, *extra)
        assert rc == 0, err
        assert len(calls) == 3  # 9 images in batches of 4, explained or not


def test_colour_maps():
    white = classify.DIVERGING[len(classify.DIVERGING) // 2]
    assert classify.colourize(np.zeros(1), -2.0, 2.0, classify.DIVERGING)[0].tolist() == list(white)
    ends = classify.colourize(np.array([-5.0, 5.0]), -2.0, 2.0, classify.DIVERGING)  # clipped
    assert ends.tolist() == [list(classify.DIVERGING[0]), list(classify.DIVERGING[-1])]


def test_bad_explain_options_exit_2_one_line_no_csv(trained, cpen_root, tmp_path, capsys):
    ckpt, _ = trained
    a_file, a_dir = tmp_path / "taken.png", tmp_path / "adir"
    a_file.write_text("x")
    a_dir.mkdir()
    cases = {"--explain is a file": (["--explain", a_file], "taken.png"),
             "limit 0": (["--explain", tmp_path / "e", "--explain-limit", 0], "--explain-limit"),
             "limit negative": (["--explain", tmp_path / "e", "--explain-limit", -3], "--explain-limit"),
             "limit alone": (["--explain-limit", 2], "--explain-limit"),
             "--explain-out is a directory": (["--explain-out", a_dir], "adir")}
    out = tmp_path / "pred.csv"
    for name, (argv, needle) in cases.items():
        rc, _, err = run_main(capsys, "--checkpoint", ckpt, "--data-dir", cpen_root, "--out", out, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (name, err)
        assert not out.exists() and not (tmp_path / "e").exists(), name


# ---------------------------------------------------------------------------------------------
# Under torchrun: every process scores a shard, rank 0 writes what one process would.

def run_torchrun(*argv):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "classify.py"), *map(str, argv), "--device", "cpu", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_torchrun_two_processes_gloo_write_what_one_does(trained, cpen_root, tmp_path, capsys):
    """9 images over 2 processes (4 and 5): the CSV, the logits, the metrics and the maps (for 6
    images, from both shards) are those of one process, in input order, printed once."""
    ckpt, _ = trained
    outputs = {}
    for name in ("one", "two"):
        folder = tmp_path / name
        argv = ["--checkpoint", ckpt, "--data-dir", cpen_root, "--split", "val", "--out", folder / "p.csv",
                "--logits", folder / "ll.npy", "--metrics-out", folder / "m.json",
                "--explain-out", folder / "maps.npz", "--explain-limit", 6, "--batch-size", 2]
        if name == "one":
            rc, stdout, err = run_main(capsys, *argv)
        else:
            result = run_torchrun(*argv)
            rc, stdout, err = result.returncode, result.stdout, result.stderr
        assert rc == 0, err[-3000:]
        outputs[name] = folder, stdout
    (one, _), (two, stdout) = outputs["one"], outputs["two"]
    assert stdout.count("macro F1") == 1 and "2 processes" in stdout  # rank 0 alone prints
    ids, predictions, loglik = csv_log_likelihoods(two / "p.csv")
    assert ids == csv_ids(cpen_root / "val.csv")
    ids1, predictions1, loglik1 = csv_log_likelihoods(one / "p.csv")
    np.testing.assert_array_equal(predictions, predictions1)
    np.testing.assert_allclose(loglik, loglik1, rtol=1e-6)
    np.testing.assert_allclose(np.load(two / "ll.npy"), np.load(one / "ll.npy"), rtol=1e-6)
    metrics, metrics1 = (json.loads((d / "m.json").read_text()) for d in (two, one))
    assert metrics["confusion_matrix"] == metrics1["confusion_matrix"]
    assert metrics["bits_per_dim"] == pytest.approx(metrics1["bits_per_dim"], rel=1e-6)
    maps, maps1 = np.load(two / "maps.npz"), np.load(one / "maps.npz")
    assert sorted(maps.files) == sorted(maps1.files) and len(maps.files) == 3 * 6
    for key in maps.files:
        np.testing.assert_allclose(maps[key], maps1[key], rtol=1e-5, atol=1e-5)


def test_torchrun_a_failure_in_one_shard_ends_the_run_with_one_line(trained, tmp_path):
    """The corrupt image is the last one: only rank 1's shard has it. Rank 0 reports it, once."""
    ckpt, _ = trained
    folder = tmp_path / "imgs"
    for i, image in enumerate(class_images([0, 1, 2], seed=4)):
        write_image(str(folder / f"{i}.png"), image)
    (folder / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "p.csv"
    result = run_torchrun("--checkpoint", ckpt, "--data-dir", folder, "--out", out)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("classify.py")]
    assert len(ours) == 1 and "9.png" in ours[0], result.stderr[-3000:]
    assert not out.exists()


def test_explain_maps_stay_inside_their_folder_one_file_per_id():
    assert classify.explain_paths("maps", ["test/0001.jpg", "b.png"]) == ["maps/test/0001.png", "maps/b.png"]
    for ids, message in [(["../up.jpg"], "outside maps"), (["sub/../../up.jpg"], "outside maps"),
                         (["a.jpg", "a.png"], "'a.jpg' and 'a.png' would share one map file")]:
        with pytest.raises(classify.UsageError, match=message):
            classify.explain_paths("maps", ids)


def test_several_checkpoints_score_by_the_mean_of_their_log_likelihoods(trained, cpen_root, tmp_path, capsys):
    """A product of experts: log p(x|c) is the mean over the checkpoints, and the posterior uses
    the mean of their temperatures; experts must agree on the labels and the image size."""
    first = with_temperature(trained[0], 4.0, tmp_path)
    state = torch.load(trained[0], weights_only=True)
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["ema"].items()}
    second = str(tmp_path / "second.pt")
    save_checkpoint(second, {**state, "ema": other, "temperature": 8.0})
    logits = {}
    for name, checkpoints in [("a", [first]), ("b", [second]), ("ab", [first, second])]:
        rc, stdout, err = run_main(capsys, "--checkpoint", *checkpoints, "--data-dir", cpen_root, "--split", "val",
                                   "--out", tmp_path / f"{name}.csv", "--logits", tmp_path / f"{name}.npy",
                                   "--metrics-out", tmp_path / f"{name}.json")
        assert rc == 0, err
        logits[name] = np.load(tmp_path / f"{name}.npy")
    assert "2 experts; posteriors at the mean of their temperatures, 6" in stdout
    assert not np.allclose(logits["a"], logits["b"])
    np.testing.assert_allclose(logits["ab"], (logits["a"] + logits["b"]) / 2, rtol=1e-10)
    _, rows = read_csv(tmp_path / "ab.csv")
    np.testing.assert_allclose(np.array([[float(v) for v in r[2 + K:]] for r in rows]), softmax(logits["ab"] / 6.0),
                               rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "ab.json").read_text())["checkpoint"] == [first, second]
    wider = str(tmp_path / "wider.pt")
    model = build_model({**CONFIG, "image_size": 16})
    save_checkpoint(wider, {"model": model.state_dict(), "ema": model.state_dict(),
                            "config": {**CONFIG, "image_size": 16}})
    rc, _, err = run_main(capsys, "--checkpoint", first, wider, "--data-dir", cpen_root, "--out", tmp_path / "c.csv")
    assert rc == 2 and "image_size 16" in err and not (tmp_path / "c.csv").exists()
