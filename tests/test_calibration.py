"""bench/calibration.py: on overconfident log-likelihoods the fitted temperature lowers ECE and
NLL; on biased ones a fitted prior also wins images back, cross-fitted; --save stores exactly
those fits in a copy of the checkpoint, from its own logits only; bad inputs exit 2 with one line
and write nothing."""
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # appended: bench/sampling.py must not shadow sampling.py

import calibration  # noqa: E402
import classify  # noqa: E402
import dataset  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from conftest import randomize_label_parameters  # noqa: E402
from model import build_model  # noqa: E402
from utils import fit_prior, fit_temperature  # noqa: E402


def overconfident(n=200, k=4, seed=0):
    """log p(x|c) [n, k] whose argmax is right 3 times in 4 but whose margins are tens of nats,
    as a generative classifier's are; and the labels [n]."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, k, n)
    scores = rng.normal(0, 1, (n, k))
    scores[np.arange(n), labels] += 1.2
    return -3000 + 30 * scores, labels


def write_inputs(folder, log_likelihoods, labels):
    """classify.py's --logits file and the id,label CSV it scored (ids need not exist as files)."""
    logits, csv = str(folder / "ll.npy"), str(folder / "split.csv")
    np.save(logits, log_likelihoods)
    with open(csv, "w") as f:
        f.writelines(f"train/{i:04d}.jpg,{label}\n" for i, label in enumerate(labels))
    return logits, csv


def printed(out):
    """calibration.py's lines -> {name: {"T": .., "right": .., "ECE": .., "NLL": .., "Brier": ..}}."""
    rows = {}
    for line in out.splitlines():
        match = re.match(r"(.+?)\s+T\s+(\S+)\s+right\s+(\d+)/\d+\s+ECE (\S+)\s+NLL (\S+)\s+Brier (\S+)", line)
        if match:
            rows[match[1]] = dict(zip(("T", "right", "ECE", "NLL", "Brier"), map(float, match.groups()[1:])))
    return rows


def test_the_fitted_temperature_calibrates(tmp_path, capsys):
    ll, labels = overconfident()
    logits, csv = write_inputs(tmp_path, ll, labels)
    assert calibration.main(["--logits", logits, "--csv", csv]) == 0
    rows = printed(capsys.readouterr().out)

    raw, fitted = rows["the model's own posterior"], rows["T fitted on these images (in-sample)"]
    assert raw["T"] == 1 and fitted["T"] > 5
    assert fitted["ECE"] < raw["ECE"] / 2 and fitted["NLL"] < raw["NLL"] / 2
    assert fitted["T"] == pytest.approx(fit_temperature(torch.from_numpy(ll), torch.from_numpy(labels)), abs=1e-3)
    halves = [rows[f"T fitted on half {a}, scored on half {b}"] for a, b in ("AB", "BA")]
    assert all(half["ECE"] < raw["ECE"] for half in halves)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(demo data root, a tiny model's checkpoint, classify.py's --logits of its val.csv, those
    log-likelihoods [N, 4], the labels [N]), and the same logits under --hflip and of another model."""
    folder = tmp_path_factory.mktemp("scored")
    data = dataset.make_demo_dataset(str(folder / "demo"), seed=1, n_per_class=2, n_val_per_class=3,
                                     n_test_per_class=1, image_size=8)
    config = {"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2, "num_classes": 4, "embedding_dim": 4,
              "block_conditioning": "bias", "image_size": 8}
    paths = {}
    for seed, name in ((0, "model"), (1, "other")):
        torch.manual_seed(seed)
        model = randomize_label_parameters(build_model(config), seed=seed)
        paths[name] = str(folder / f"{name}.pt")
        save_checkpoint(paths[name], {"model": model.state_dict(), "ema": None, "config": config, "step": 7})
    csv = os.path.join(data, "val.csv")
    logits = {}
    for name, checkpoint, extra in (("own", paths["model"], []), ("hflip", paths["model"], ["--hflip"]),
                                    ("other", paths["other"], [])):
        logits[name] = str(folder / f"{name}.npy")
        assert classify.main(["--checkpoint", checkpoint, "--data-dir", data, "--csv", csv, "--out",
                              str(folder / f"{name}.csv"), "--logits", logits[name], "--no-progress"] + extra) == 0
    labels = np.array([label for _, label in dataset.parse_split_csv(csv, 4, allow_unknown=False)])
    return data, paths["model"], logits, np.load(logits["own"]), labels


def test_save_stores_the_fits_of_the_checkpoints_own_logits(scored, tmp_path, capsys):
    data, checkpoint, logits, ll, labels = scored
    saved = str(tmp_path / "model_T.pt")
    assert calibration.main(["--logits", logits["own"], "--csv", os.path.join(data, "val.csv"), "--checkpoint",
                             checkpoint, "--data-dir", data, "--save", saved]) == 0
    assert f"wrote {saved}" in capsys.readouterr().out
    state, original = load_checkpoint(saved), load_checkpoint(checkpoint)
    assert state["temperature"] == fit_temperature(torch.from_numpy(ll), torch.from_numpy(labels))
    prior_temperature, log_prior = fit_prior(torch.from_numpy(ll), torch.from_numpy(labels))
    assert state["fitted_prior"] == {"temperature": prior_temperature, "log_prior": log_prior.tolist()}
    assert state["step"] == 7 and all(torch.equal(state["model"][k], v) for k, v in original["model"].items())
    assert "temperature" not in original


def test_save_refuses_logits_that_are_not_the_checkpoints_own(scored, tmp_path, capsys):
    """Another model's logits of the same images, or the mean of two views (--hflip), would store a
    temperature fitted on other scores."""
    data, checkpoint, logits, ll, labels = scored
    saved = tmp_path / "model_T.pt"
    for name in ("other", "hflip"):
        assert calibration.main(["--logits", logits[name], "--csv", os.path.join(data, "val.csv"), "--checkpoint",
                                 checkpoint, "--data-dir", data, "--save", str(saved)]) == 2
        err = capsys.readouterr().err
        assert f"{logits[name]} is not {checkpoint}'s log p(x|c) of its first 4 images" in err
        assert err.count("\n") == 1 and not saved.exists()
    # The checkpoint's own logits with labels that its scores put last: T runs to its bound.
    worst = tmp_path / "worst.csv"
    ids = [item_id for item_id, _ in dataset.parse_split_csv(os.path.join(data, "val.csv"), 4)]
    worst.write_text("".join(f"{item_id},{label}\n" for item_id, label in zip(ids, ll.argmin(axis=1))))
    assert calibration.main(["--logits", logits["own"], "--csv", str(worst), "--checkpoint", checkpoint,
                             "--data-dir", data, "--save", str(saved)]) == 2
    assert "the fitted T is at its bound" in capsys.readouterr().err and not saved.exists()


def test_a_fitted_prior_wins_back_what_a_biased_model_loses(tmp_path, capsys):
    """Class 3 runs 40 nats high on every image: T alone keeps its wrong argmax, the prior fitted
    on one half takes the bias off on the other half."""
    ll, labels = overconfident(n=400)
    ll[:, 3] += 40
    logits, csv = write_inputs(tmp_path, ll, labels)
    assert calibration.main(["--logits", logits, "--csv", csv]) == 0
    rows = printed(capsys.readouterr().out)
    for a, b in ("AB", "BA"):
        alone, with_prior = (rows[f"{fit} fitted on half {a}, scored on half {b}"] for fit in ("T", "T and prior"))
        assert with_prior["right"] > alone["right"] + 10 and with_prior["NLL"] < alone["NLL"]


def test_held_out_takes_the_labels_of_the_split_the_run_held_out(tmp_path, capsys):
    """--held-out val recomputes the validation split from the checkpoint's stored keys: the same
    figures as --csv with that split's id,label rows."""
    data = dataset.make_demo_dataset(str(tmp_path / "demo"), seed=1, n_per_class=8, n_val_per_class=1,
                                     n_test_per_class=1, image_size=8)
    checkpoint = str(tmp_path / "run.pt")
    save_checkpoint(checkpoint, {"model": {}, "config": {"val_split": "nosuch", "val_fraction": 0.25, "seed": 3}})
    items = dataset.read_split_csv(data, os.path.join(data, "train.csv"), allow_unknown=False)
    val_items = dataset.split_train_val(items, 0.25, seed=3)[1]
    ll, _ = overconfident(n=len(val_items))
    logits, csv = write_inputs(tmp_path, ll, [label for _, label in val_items])
    assert calibration.main(["--logits", logits, "--csv", csv]) == 0
    from_csv = capsys.readouterr().out
    assert calibration.main(["--logits", logits, "--held-out", "val", "--checkpoint", checkpoint,
                             "--data-dir", data]) == 0
    assert capsys.readouterr().out == from_csv


def test_too_few_images_to_cross_fit_give_the_in_sample_lines_alone(tmp_path, capsys):
    ll, labels = overconfident(n=3)
    logits, csv = write_inputs(tmp_path, ll, np.array([0, 1, 2]))  # one image a label: no half B
    assert calibration.main(["--logits", logits, "--csv", csv]) == 0
    out = capsys.readouterr().out
    assert "too few images of each label to cross-fit" in out and "half" not in out.replace("cross-fit", "")
    assert "T fitted on these images (in-sample)" in printed(out)


def test_the_halves_split_the_rows_even_where_the_csv_repeats_an_id(tmp_path):
    """Each id twice (a CSV that lists an image twice, with a row of --logits for each): the
    halves share no row and together hold every row."""
    csv = tmp_path / "twice.csv"
    csv.write_text("".join(f"train/{i // 2:04d}.jpg,{i // 2 % 4}\n" for i in range(40)))
    items = dataset.parse_split_csv(str(csv), 4, allow_unknown=False)
    (fit_a, score_b, _), (fit_b, score_a, _) = calibration.cross_fitting_halves(items)
    assert torch.equal(fit_a, score_a) and torch.equal(fit_b, score_b)
    assert sorted(fit_a.tolist() + fit_b.tolist()) == list(range(40))


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    ll, labels = overconfident(n=20)
    logits, csv = write_inputs(tmp_path, ll, labels)
    short_logits = str(tmp_path / "short.npy")
    np.save(short_logits, ll[:10])
    flat_logits = str(tmp_path / "flat.npy")
    np.save(flat_logits, ll[:, 0])
    nan_logits = str(tmp_path / "nan.npy")
    np.save(nan_logits, np.where(np.arange(20)[:, None] == 3, np.nan, ll))
    inf_logits = str(tmp_path / "inf.npy")
    np.save(inf_logits, np.where(np.arange(20)[:, None] == 3, -np.inf, ll))
    text = tmp_path / "text.npy"
    text.write_text("not numpy")
    wide_labels = tmp_path / "wide.csv"
    wide_labels.write_text("train/0.jpg,4\n")
    saved = tmp_path / "saved.pt"
    five_labels = str(tmp_path / "five.pt")
    save_checkpoint(five_labels, {"model": {}, "config": {"num_classes": 5}})
    model = str(tmp_path / "model.pt")
    save_checkpoint(model, {"model": {}, "config": {"num_classes": 4}})
    cases = {
        "name the checkpoint too": ["--logits", logits, "--csv", csv, "--save", str(saved)],
        "checkpoint not found": ["--logits", logits, "--csv", csv, "--checkpoint", str(tmp_path / "no.pt"),
                                 "--data-dir", str(tmp_path), "--save", str(saved)],
        "--save needs --data-dir": ["--logits", logits, "--csv", csv, "--checkpoint", model, "--save", str(saved)],
        "has 20 images": ["--logits", short_logits, "--csv", csv],
        "expected [images, classes]": ["--logits", flat_logits, "--csv", csv],
        "not a .npy array": ["--logits", str(text), "--csv", csv],
        f"{nan_logits}: holds NaN or infinite values": ["--logits", nan_logits, "--csv", csv],
        f"{inf_logits}: holds NaN or infinite values": ["--logits", inf_logits, "--csv", csv],
        "label 4 is outside 0..3": ["--logits", logits, "--csv", str(wide_labels)],
        "CSV file not found": ["--logits", logits, "--csv", str(tmp_path / "no.csv")],
        "required": ["--csv", csv],
        "give the labels of the scored images": ["--logits", logits],
        "--held-out needs --checkpoint and --data-dir": ["--logits", logits, "--held-out", "val"],
        "is the same file as --csv": ["--logits", logits, "--csv", csv, "--checkpoint", model, "--save", csv],
        "scores 4 labels, ": ["--logits", logits, "--csv", csv, "--checkpoint", five_labels,
                              "--data-dir", str(tmp_path), "--save", str(saved)],
    }
    for message, argv in cases.items():
        try:
            code = calibration.main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.count("\n") == 1 and message in err, err
        assert not saved.exists()


def test_cross_fitted_lines_fit_on_one_half_and_score_the_other(tmp_path, capsys):
    """Each cross-fitted line is exactly the figures of the other half's rows, at the fit of its own
    half alone; and the printed prior is the fitted prior, as probabilities."""
    ll, labels = overconfident(n=120)
    ll[:, 3] += 40
    logits, csv = write_inputs(tmp_path, ll, labels)
    assert calibration.main(["--logits", logits, "--csv", csv]) == 0
    out = capsys.readouterr().out
    ll, labels = torch.from_numpy(ll), torch.from_numpy(labels)
    items = dataset.parse_split_csv(csv, 4, allow_unknown=False)
    (fit_a, score_b, _), (fit_b, score_a, _) = calibration.cross_fitting_halves(items)
    for fit, score, name in ((fit_a, score_b, "half A, scored on half B"),
                             (fit_b, score_a, "half B, scored on half A")):
        assert len(set(fit.tolist()) & set(score.tolist())) == 0
        expected_t = calibration.line(f"T fitted on {name}", ll[score], labels[score],
                                      fit_temperature(ll[fit], labels[fit]))
        expected_prior = calibration.line(f"T and prior fitted on {name}", ll[score], labels[score],
                                          *fit_prior(ll[fit], labels[fit]))
        assert expected_t in out.splitlines() and expected_prior in out.splitlines()
    prior = [float(p) for p in re.search(r"the fitted prior: (.*)", out)[1].split(", ")]
    assert abs(sum(prior) - 1) < 1e-3
    assert np.allclose(prior, fit_prior(ll, labels)[1].exp().numpy(), atol=1e-4)
