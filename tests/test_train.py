import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)
import dataset  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from utils import training_loss  # noqa: E402
from checkpoint import for_inference, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402

TINY = ["--nr-resnet", "1", "--nr-filters", "8", "--nr-logistic-mix", "2", "--embedding-dim", "4",
        "--image-size", "8", "--dropout", "0.2", "--batch-size", "8", "--eval-batch-size", "16",
        "--samples-per-class", "0", "--wandb", "disabled",
        "--lr", "0.002", "--ema-decay", "0.9"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """24 training and 8 validation images of 8x8: 3 steps per epoch at batch 8."""
    root = str(tmp_path_factory.mktemp("data") / "demo")
    return dataset.make_demo_dataset(root, seed=1, n_per_class=6, n_val_per_class=2,
                                     n_test_per_class=1, image_size=8)


def args(data, out, *extra):
    return [*TINY, "--data-dir", data, "--out-dir", str(out), *map(str, extra)]


def run_cli(argv, timeout=120, cwd=REPO, **kwargs):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *argv], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --- configuration ------------------------------------------------------------------------------

def test_unknown_flag_exits_2_with_one_line():
    result = run_cli(["--bogus-key", "3"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bogus-key" in lines[0]


def test_config_errors_name_the_key(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("nr_filters: 8\nlearning_rate: 0.1\n")
    for argv, name in [(["--config", str(bad_yaml)], "learning_rate"),
                       (["--epochs", "many"], "epochs"),
                       (["--block-conditioning", "sideways"], "block_conditioning"),
                       (["--max-time", "soon"], "max_time"),
                       (["--config", str(tmp_path / "missing.yaml")], "missing.yaml")]:
        assert train.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0], (argv, err)


def test_bad_data_stops_before_training(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train.csv").write_text("train/missing.png,0\r\n")
    out = tmp_path / "out"
    assert train.main(args(str(root), out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.csv, row 1" in err[0] and "missing.png" in err[0]
    assert not os.path.exists(out / "last.pt")
    (root / "train.csv").write_text("train/missing.png,7\r\n")
    assert train.main(args(str(root), out)) == 2
    assert "label 7 is outside 0..3" in capsys.readouterr().err
    assert train.main(args(str(tmp_path / "nowhere"), out)) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("not a folder\n")
    assert train.main(args(str(root), tmp_path / "a_file" / "out")) == 2
    assert capsys.readouterr().err.count("is a file, not a folder") == 1


def test_a_missing_data_dir_is_an_error_even_with_the_demo_config(tmp_path):
    """Only the demo's own path, data/demo, gets the demo set generated: a mistyped --data-dir
    gives one line and exit 2, and nothing is written."""
    result = run_cli(["--config", os.path.join(REPO, "configs", "demo.yaml"), "--data-dir", "/no/such/dir",
                      "--out-dir", "out"], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data directory not found: /no/such/dir" in lines[0], lines
    assert not os.path.exists("/no/such/dir") and os.listdir(tmp_path) == []


# --- training, checkpoints and resume ------------------------------------------------------------

def test_checkpoint_contents_and_refusal_to_overwrite(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1", "--samples-per-class", "1")) == 0
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        for key in ("model", "ema", "optimizer", "scheduler", "config", "epoch", "step", "rng",
                    "wandb_id", "best"):
            assert key in state
        assert state["epoch"] == 1 and state["step"] == 3 and state["batch_in_epoch"] == 0
        assert set(train.DEFAULTS) == set(state["config"])
        model = model_from_checkpoint(load_checkpoint(str(out / name)))
        x = torch.zeros(2, 3, 8, 8)
        assert model(x, torch.tensor([0, 3])).shape == (2, 20, 8, 8)
    metrics = read_metrics(out)
    assert len(metrics) == 1
    assert set(metrics[0]) == {"epoch", "step", "train_bpd", "val_bpd", "val_acc", "temperature", "val_ece",
                               "lr", "seconds"}
    for name in ("last.pt", "best.pt"):  # the posterior's temperature, fitted on the validation split
        state = torch.load(out / name, weights_only=True)
        assert state["temperature"] == metrics[0]["temperature"] > 0
        fitted = state["fitted_prior"]  # and a prior fitted with its own temperature (--prior fitted)
        assert fitted["temperature"] > 0 and len(fitted["log_prior"]) == 4
        assert torch.tensor(fitted["log_prior"]).logsumexp(0).abs() < 1e-6
    assert os.path.isfile(out / "samples_epoch0001.png") and os.path.isfile(out / "config.yaml")
    capsys.readouterr()
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 2  # would clobber last.pt
    assert "--resume" in capsys.readouterr().err
    # --overwrite starts afresh: the earlier run's metrics and sample grids go, not appended to
    old_id = torch.load(out / "last.pt", weights_only=True)["wandb_id"]
    assert train.main(args(tiny_data, out, "--epochs", "1", "--overwrite")) == 0
    assert [m["step"] for m in read_metrics(out)] == [3]
    assert not os.path.exists(out / "samples_epoch0001.png")
    new_ids = {torch.load(out / name, weights_only=True)["wandb_id"] for name in ("last.pt", "best.pt")}
    assert len(new_ids) == 1 and old_id not in new_ids


def test_a_fresh_run_keeps_what_an_earlier_run_left_without_last_pt(tiny_data, tmp_path, capsys):
    """An earlier run's best.pt and metrics.jsonl are kept even where its last.pt has gone."""
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    os.remove(out / "last.pt")
    best, metrics = (out / "best.pt").read_bytes(), (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run's metrics.jsonl, best.pt" in err and len(err.strip().splitlines()) == 1
    assert (out / "best.pt").read_bytes() == best and (out / "metrics.jsonl").read_bytes() == metrics


def test_resuming_into_another_runs_folder_is_refused(tiny_data, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(args(tiny_data, first, "--epochs", "1")) == 0
    assert train.main(args(tiny_data, second, "--epochs", "1", "--seed", "1")) == 0
    kept = {name: (second / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert train.main(["--resume", str(first / "last.pt"), "--out-dir", str(second), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{second / 'last.pt'} is another run's or a fork's" in err and len(err.strip().splitlines()) == 1
    assert {name: (second / name).read_bytes() for name in kept} == kept
    # its own run's best.pt, in its own folder, resumes there
    assert train.main(["--resume", str(first / "best.pt"), "--out-dir", str(first), "--epochs", "2"]) == 0
    # A fork (the run resumed in another folder) keeps the run's id, but the run's checkpoint may not
    # resume over the fork's: the fork's epochs would be lost.
    fork = tmp_path / "fork"
    assert train.main(["--resume", str(first / "best.pt"), "--out-dir", str(fork), "--epochs", "3"]) == 0
    kept = {name: (fork / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert train.main(["--resume", str(first / "best.pt"), "--out-dir", str(fork), "--epochs", "3"]) == 2
    assert f"{fork / 'last.pt'} is another run's or a fork's" in capsys.readouterr().err
    assert {name: (fork / name).read_bytes() for name in kept} == kept
    assert train.main(["--resume", str(fork / "last.pt"), "--out-dir", str(fork), "--epochs", "4"]) == 0


def test_resuming_with_another_split_is_refused(tiny_data, tmp_path, capsys):
    """A new --seed reseeds the validation split where split_seed is null: the run would evaluate
    on images it trained on."""
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1", "--val-split", "none", "--val-fraction", "0.25")) == 0
    last = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "the val images are not those the run held out" in err and "seed 0" in err
    assert (out / "last.pt").read_bytes() == last
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--seed", "5", "--split-seed", "0"]) == 0


def test_best_pt_stores_the_validation_figures_of_its_ema_weights(tiny_data, tmp_path):
    """val_acc, val_bpd and the temperature are those of the EMA weights (what model_from_checkpoint
    loads) on the validation images, recomputed here from the checkpoint alone."""
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "2")) == 0
    state = torch.load(out / "best.pt", weights_only=True)
    [logged] = [m for m in read_metrics(out) if m["step"] == state["step"]]
    model = model_from_checkpoint(state).eval()
    _, val, _, _ = dataset.load_train_val(tiny_data, "train", "val", 0.1, 0, image_size=8, progress=False)
    with torch.no_grad():
        ll = utils.class_log_likelihoods(model, dataset.to_model_input(val.images), 4).double()
    assert logged["val_acc"] == (ll.argmax(dim=1) == val.labels).double().mean().item()
    true_ll = ll.gather(1, val.labels[:, None]).mean()
    assert logged["val_bpd"] == pytest.approx(utils.bits_per_dim(-true_ll, (3, 8, 8)).item(), rel=1e-9)
    assert state["temperature"] == logged["temperature"] == pytest.approx(
        utils.fit_temperature(ll, val.labels), rel=1e-6)


@pytest.mark.parametrize("metric, values", [("val_acc", [0.5, 0.75, 0.75]), ("val_bpd", [5.0, 4.0, 4.0])])
def test_best_pt_keeps_the_earlier_of_two_evaluations_that_tie(tiny_data, tmp_path, monkeypatch, metric, values):
    """A later evaluation replaces best.pt only if it does strictly better."""
    figures = iter(values)

    def evaluate(*unused, **unused_too):
        return {"val_bpd": 5.0, "val_acc": 0.5, metric: next(figures), "temperature": 1.0, "val_ece": 0.0}

    monkeypatch.setattr(train, "evaluate", evaluate)
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "3", "--best-metric", metric)) == 0
    assert [m["step"] for m in read_metrics(out)] == [3, 6, 9]
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 6


def test_sample_grids_and_best_by_bits_per_dim(tiny_data, tmp_path):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "3", "--samples-per-class", "1", "--sample-every", "2",
                           "--best-metric", "val_bpd")) == 0
    assert sorted(n for n in os.listdir(out) if n.startswith("samples")) == \
        ["samples_epoch0002.png", "samples_epoch0003.png"]  # every 2 epochs, and at the end
    metrics = read_metrics(out)
    best = min(metrics, key=lambda m: m["val_bpd"])
    assert torch.load(out / "best.pt", weights_only=True)["step"] == best["step"]
    stopped = tmp_path / "stopped"  # a run that max_time ends early draws no grid
    assert train.main(args(tiny_data, stopped, "--epochs", "3", "--samples-per-class", "1",
                           "--max-time", "0.001s")) == 0
    assert not [n for n in os.listdir(stopped) if n.startswith("samples")]


def test_save_every_writes_last_pt_every_n_epochs_and_at_the_end(tiny_data, tmp_path, monkeypatch):
    saved = []
    real_save = train.Trainer.save
    monkeypatch.setattr(train.Trainer, "save",
                        lambda self, name: saved.append((name, self.progress.epoch)) or real_save(self, name))
    assert train.main(args(tiny_data, tmp_path / "out", "--epochs", "5", "--save-every", "2")) == 0
    assert [epoch for name, epoch in saved if name == "last.pt"] == [2, 4, 5]


def test_resume_is_exact(tiny_data, tmp_path):
    """Two epochs in one run == one epoch, then a resumed one == a stop after one step (max_time),
    then a resume: bitwise on a CPU, with dropout and the classification term on."""
    extra = ["--cls-loss-weight", "0.01"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train.main(args(tiny_data, a, "--epochs", "2", *extra)) == 0
    assert train.main(args(tiny_data, b, "--epochs", "1", *extra)) == 0
    b_id = torch.load(b / "last.pt", weights_only=True)["wandb_id"]
    assert train.main(args(tiny_data, b, "--epochs", "2", "--resume", *extra)) == 0
    assert train.main(args(tiny_data, c, "--epochs", "2", "--max-time", "0.001s", *extra)) == 0
    stopped = torch.load(c / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["step"]) == (0, 1, 1)
    assert train.main(args(tiny_data, c, "--resume", str(c / "last.pt"), "--max-time", "null")) == 0
    sa, sb, sc = (torch.load(d / "last.pt", weights_only=True) for d in (a, b, c))
    assert sa["step"] == sb["step"] == sc["step"] == 6
    for other in (sb, sc):
        for key in ("model", "ema", "optimizer", "scheduler", "rng"):
            assert_same_tensors(sa[key], other[key], key)
        assert other["wandb_id"] != sa["wandb_id"]
    assert sb["wandb_id"] == b_id  # the resumed run logs to the same wandb run
    assert [m["epoch"] for m in read_metrics(b)] == [1, 2]
    untimed = lambda out: [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(out)]
    assert untimed(a) == untimed(b) == untimed(c)[1:]  # c[0]: the stop; train_bpd: each epoch alone


def test_training_time_carries_on_across_a_resume(tiny_data, tmp_path):
    """metrics.jsonl's seconds (the time axis of bench/plot_curves.py) count every session's
    training, as the checkpoint's elapsed does."""
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    save_checkpoint(str(out / "last.pt"), {**state, "elapsed": 1000.0})  # as after a 1000 s session
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume")) == 0
    first, second = read_metrics(out)
    assert first["seconds"] < 1000 <= second["seconds"] < 1000 + 120
    assert torch.load(out / "last.pt", weights_only=True)["elapsed"] >= second["seconds"] - 0.005  # rounded


def test_resume_from_an_earlier_checkpoint_cuts_metrics_back_to_it(tiny_data, tmp_path):
    """As after a kill between an evaluation and its save: the epochs after the checkpoint are
    logged once, by the resumed run."""
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    shutil.copy(out / "last.pt", tmp_path / "epoch1.pt")
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume")) == 0
    logged_once = read_metrics(out)
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume", tmp_path / "epoch1.pt")) == 0
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]
    assert read_metrics(out)[-1]["val_bpd"] == logged_once[-1]["val_bpd"]


def test_a_new_best_metric_on_resume_starts_best_pt_afresh(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0  # best.pt by val_acc
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume", "--best-metric", "val_bpd")) == 0
    assert "best.pt restarts" in capsys.readouterr().err
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == 6 and best["best"] == read_metrics(out)[-1]["val_bpd"]


def test_resume_keeps_the_stored_out_dir_and_max_time(tiny_data, tmp_path):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "2", "--max-time", "0.001s")) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1
    # neither --out-dir nor --max-time given: the run goes on in out, and stops after one more step
    assert train.main([*TINY, "--data-dir", tiny_data, "--resume", str(out / "last.pt")]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


def signal_at_step(monkeypatch, step, signals):
    """Send `signals` to this process as the training step numbered `step` (from 1) begins."""
    real_step = train.Trainer.train_step

    def signal_then_step(self, x, y):
        if self.progress.step == step - 1:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real_step(self, x, y)
    monkeypatch.setattr(train.Trainer, "train_step", signal_then_step)


def test_a_signal_saves_last_pt_with_the_last_temperature(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    signal_at_step(monkeypatch, 5, [signal.SIGINT])  # Ctrl-C in the middle of epoch 2
    assert train.main(args(tiny_data, out, "--epochs", "3", "--resume")) == 128 + signal.SIGINT
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, 5)
    assert state["temperature"] == read_metrics(out)[-1]["temperature"] is not None


def test_a_second_signal_stops_at_once_without_saving(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    before = (out / "last.pt").read_bytes()
    signal_at_step(monkeypatch, 5, [signal.SIGTERM, signal.SIGTERM])
    assert train.main(args(tiny_data, out, "--epochs", "3", "--resume")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before


def test_a_shipped_copy_is_refused_before_the_data_is_read(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    save_checkpoint(tmp_path / "shipped.pt", for_inference(load_checkpoint(out / "last.pt")))
    capsys.readouterr()
    assert train.main(args(str(tmp_path / "no-data"), tmp_path / "again", "--resume", tmp_path / "shipped.pt")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume from it" in err[0]


def test_resume_cannot_change_the_model(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume", "--nr-filters", "16")) == 2
    assert "nr_filters" in capsys.readouterr().err


def test_resume_with_a_new_lr_restarts_the_schedule(tiny_data, tmp_path):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1", "--lr-decay", "0.5")) == 0
    assert read_metrics(out)[-1]["lr"] == pytest.approx(0.002 * 0.5 ** 3)
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume", "--lr", "0.001",
                           "--lr-decay", "0.9")) == 0
    assert read_metrics(out)[-1]["lr"] == pytest.approx(0.001 * 0.9 ** 3)


def test_lr_restart_starts_the_decay_again_at_the_runs_own_lr_for_that_chunk_only(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1", "--lr-decay", "0.5")) == 0
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume", "--lr", "0.002")) == 0
    assert read_metrics(out)[-1]["lr"] == pytest.approx(0.002 * 0.5 ** 6)  # the run's own lr: decay goes on
    assert train.main(args(tiny_data, out, "--epochs", "3", "--resume", "--lr-restart")) == 0
    assert "lr restarts at 0.002" in capsys.readouterr().err
    assert read_metrics(out)[-1]["lr"] == pytest.approx(0.002 * 0.5 ** 3)
    assert train.main(args(tiny_data, out, "--epochs", "4", "--resume")) == 0  # the restart is not kept
    assert read_metrics(out)[-1]["lr"] == pytest.approx(0.002 * 0.5 ** 6)
    assert train.main(args(tiny_data, tmp_path / "fresh", "--epochs", "1", "--lr-restart")) == 2
    assert "needs resume" in capsys.readouterr().err


def test_progress_false_leaves_the_log_lines_alone_for_that_chunk_only(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1", "--progress", "false")) == 0
    quiet = capsys.readouterr().err
    assert "epoch 1 step 3: train" in quiet and "batch/s" not in quiet and "epoch 1/1" not in quiet
    assert train.main(args(tiny_data, out, "--epochs", "2", "--resume")) == 0  # bars are back
    assert "epoch 2/2" in capsys.readouterr().err


def test_max_time_ends_cleanly(tiny_data, tmp_path):
    out = tmp_path / "out"
    start = time.time()
    assert train.main(args(tiny_data, out, "--epochs", "100000", "--max-time", "1s")) == 0
    assert time.time() - start < 60
    state = torch.load(out / "last.pt", weights_only=True)
    assert 0 < state["step"] < 300000
    assert read_metrics(out)[-1]["step"] == state["step"]


def test_nonfinite_loss_stops_and_keeps_checkpoints(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1")) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    real_nll, calls = utils.discretized_mix_logistic_nll, []

    def poisoned(x, params):
        calls.append(1)
        nll = real_nll(x, params)
        return nll * float("nan") if len(calls) == 2 else nll
    monkeypatch.setattr(utils, "discretized_mix_logistic_nll", poisoned)  # inside training_loss
    capsys.readouterr()
    assert train.main(args(tiny_data, out, "--epochs", "3", "--resume")) == 3
    err = capsys.readouterr().err
    assert "nan" in err and "step 5" in err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_sigterm_saves_last_and_sigkill_leaves_a_loadable_checkpoint(tiny_data, tmp_path):
    """The whole program under both signals. SIGKILL lands at whatever moment it lands, rarely
    inside a save: test_checkpoint kills a process in the middle of its write on purpose."""
    out = tmp_path / "out"
    argv = args(tiny_data, out, "--epochs", "100000", "--eval-every", "1000", "--save-every", "1")
    log_path = tmp_path / "stderr.txt"

    def log_tail():
        return log_path.read_text()[-2000:]

    def start_and_wait_for_checkpoint(started):
        # stderr goes to a file: a pipe that nobody reads could fill up and block the child
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *argv], cwd=REPO,
                                    env=ENV, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 120
        while not os.path.isfile(out / "last.pt") or os.path.getmtime(out / "last.pt") < started:
            assert proc.poll() is None, log_tail()
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"no checkpoint written: {log_tail()}")
            time.sleep(0.05)
        time.sleep(0.3)  # mid-training, maybe mid-save
        return proc

    proc = start_and_wait_for_checkpoint(time.time())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log_tail()
    assert "saved" in log_tail()
    saved = torch.load(out / "last.pt", weights_only=True)

    argv += ["--resume"]
    proc = start_and_wait_for_checkpoint(time.time())
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait(timeout=60)
    killed = load_checkpoint(str(out / "last.pt"))
    assert killed["step"] > saved["step"]
    result = run_cli(args(tiny_data, out, "--resume", "--epochs", killed["epoch"] + 1), timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    final = torch.load(out / "last.pt", weights_only=True)
    assert final["epoch"] == killed["epoch"] + 1 and final["batch_in_epoch"] == 0
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_torchrun_two_processes_gloo_train_as_one_at_twice_the_batch(tiny_data, tmp_path):
    """Two processes at batch 8 average their gradients: without dropout they train as one
    process at batch 16 does, on the same images (rank r takes every other image of its order)."""
    out, one = tmp_path / "out", tmp_path / "one"
    same = ["--epochs", "2", "--device", "cpu", "--dropout", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), *args(tiny_data, out, *same)]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(str(out / "last.pt"))
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    ranks = [rank_state["torch"] for rank_state in state["rng_per_rank"]]
    assert not torch.equal(*ranks)  # seeded with seed + rank: each process draws its own dropout masks
    assert state["step"] == 4  # 24 images over 2 processes at batch 8: 2 steps per epoch
    assert not any(k.startswith("module.") for k in state["model"])
    assert len(read_metrics(out)) == 2  # rank 0 only

    result = run_cli(args(tiny_data, one, *same, "--batch-size", "16"))
    assert result.returncode == 0, result.stderr[-3000:]
    alone = load_checkpoint(str(one / "last.pt"))
    gaps = torch.cat([(state["model"][k] - alone["model"][k]).abs().flatten() for k in alone["model"]])
    # summed in another order, the gradients differ in rounding; a rank training on its own half
    # moves the median weight by about the rate, 2e-3
    assert gaps.median() < 1e-6 and gaps.max() < 5e-3, (gaps.median(), gaps.max())
    assert read_metrics(out)[-1]["train_bpd"] == pytest.approx(read_metrics(one)[-1]["train_bpd"], abs=1e-4)


def test_demo_config_learns_to_classify(tmp_path):
    """The demo config, on the demo data generated at its default path (data/demo, relative to
    where train.py runs), shrunk to 16x16 and 2 epochs for speed."""
    out = tmp_path / "out"
    result = run_cli(["--config", os.path.join(REPO, "configs", "demo.yaml"), "--out-dir", str(out),
                      "--image-size", "16", "--epochs", "2", "--samples-per-class", "0", "--wandb", "disabled"],
                     timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "data" / "demo" / "train.csv")  # generated on the fly
    metrics = read_metrics(out)
    assert metrics[-1]["val_acc"] > 0.7, metrics  # chance is 0.25


def test_compile_trains_as_the_eager_model_does(tiny_data, tmp_path, monkeypatch):
    """--compile compiles the network and its loss as one graph (here run by the eager backend,
    which skips minutes of code generation): the same training, within float rounding (the
    traced ops are the plain formulations of layers.py's hand-written ones), but for a smaller
    last batch, which each epoch drops."""
    compile_, modes = torch.compile, []

    def compile_eagerly(function, mode):
        modes.append(mode)
        return compile_(function, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(args(tiny_data, eager, "--epochs", "1", "--dropout", "0")) == 0
    assert train.main(args(tiny_data, compiled, "--epochs", "1", "--dropout", "0", "--compile", "true",
                           "--compile-mode", "reduce-overhead")) == 0
    assert modes == ["reduce-overhead"]  # what train.py passed on
    a, b = (torch.load(out / "last.pt", weights_only=True) for out in (eager, compiled))
    for name, weights in a["ema"].items():  # Adam moves each weight by up to lr = 2e-3 a step
        assert torch.allclose(weights, b["ema"][name], rtol=1e-4, atol=2e-5), name
    assert read_metrics(eager)[-1]["val_bpd"] == pytest.approx(read_metrics(compiled)[-1]["val_bpd"], rel=1e-5)
    # 24 images at batch 10: compiled, each epoch drops its smaller last batch (one shape, one graph)
    assert train.main(args(tiny_data, tmp_path / "drop", "--epochs", "1", "--batch-size", "10",
                           "--compile", "true")) == 0
    assert torch.load(tmp_path / "drop" / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("augmentation", [["--hflip"], ["--shift", "2"]])
def test_augmentation_changes_training_and_resumes_exactly(tiny_data, tmp_path, augmentation):
    a, b, plain = tmp_path / "a", tmp_path / "b", tmp_path / "plain"
    assert train.main(args(tiny_data, a, "--epochs", "2", *augmentation)) == 0
    assert train.main(args(tiny_data, b, "--epochs", "1", *augmentation)) == 0
    assert train.main(args(tiny_data, b, "--epochs", "2", "--resume")) == 0  # it comes from the checkpoint
    assert train.main(args(tiny_data, plain, "--epochs", "2")) == 0
    sa, sb, sp = (torch.load(d / "last.pt", weights_only=True) for d in (a, b, plain))
    assert sb["config"]["hflip"] is ("--hflip" in augmentation)
    assert sb["config"]["shift"] == (2 if "--shift" in augmentation else 0)
    assert_same_tensors(sa["model"], sb["model"], "model")
    assert any(not torch.equal(sa["model"][k], sp["model"][k]) for k in sa["model"])  # flips mattered


def test_a_bf16_step_matches_float32_and_bf16_training_learns():
    """bf16 autocast (what --amp turns on) gives a loss within 1% of float32's on the same
    weights and batch, and a few bf16 steps lower it; the loss itself stays float32."""
    from model import build_model
    torch.manual_seed(0)
    config = {"nr_resnet": 1, "nr_filters": 16, "nr_logistic_mix": 3, "num_classes": 2, "embedding_dim": 0,
              "block_conditioning": "film", "image_size": 8, "dropout": 0.0}
    net = build_model(config).to(memory_format=torch.channels_last)
    x = (torch.randint(0, 256, (16, 3, 8, 8)) / 127.5 - 1).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (16,))
    fp32, _ = training_loss(net, x, y, 2, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = training_loss(net, x, y, 2, 0.0)
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 0.01 * fp32.item()
    # 30 Adam steps from the same start, in bf16 and in float32: both learn, bf16 as well as float32.
    final = {}
    for bf16_on in (True, False):
        trained = copy.deepcopy(net)
        optimizer = torch.optim.Adam(trained.parameters(), lr=0.005)
        for _ in range(30):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_on):
                loss, _ = training_loss(trained, x, y, 2, 0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        final[bf16_on] = training_loss(trained, x, y, 2, 0.0)[0].item()  # scored in float32
    assert final[False] < 0.85 * fp32.item()
    assert final[True] < final[False] * 1.03, final


def test_amp_says_so_where_the_cpu_has_no_bf16(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert train.main(args(tiny_data, tmp_path / "out", "--epochs", "1", "--amp", "--device", "cpu")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("amp:")]
    assert lines == ["amp: cpu has no native bf16 (on CPUs: AVX512-BF16 or AMX); training in float32"]


def test_the_report_split_is_held_out_and_written_for_classify(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1", "--report-fraction", "0.25")) == 0
    assert "16 training images, 8 validation images (val.csv), 8 held out to report on" in capsys.readouterr().err
    report = dataset.read_split_csv(tiny_data, str(out / "splits" / "report.csv"), allow_unknown=False)
    val = dataset.read_split_csv(tiny_data, str(out / "splits" / "val.csv"), allow_unknown=False)
    with open(os.path.join(tiny_data, "train.csv")) as f:
        train_ids = {line.split(",")[0] for line in f}
    assert len(report) == 8 and {i for i, _ in report} <= train_ids and not {i for i, _ in val} & train_ids
    assert sorted(label for _, label in report) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.load(out / "last.pt", weights_only=True)["config"]["report_fraction"] == 0.25

    # A fresh run in the same folder without a report split leaves no report.csv of images it trains on.
    assert train.main(args(tiny_data, out, "--epochs", "1", "--overwrite")) == 0
    assert not (out / "splits" / "report.csv").exists() and (out / "splits" / "val.csv").exists()


def record_calls(monkeypatch, owner, name):
    """Wrap owner.name so that each call is recorded: -> the list of (its positional arguments,
    its result), which grows as train.py calls it."""
    calls, real = [], getattr(owner, name)

    def recorded(*positional, **keywords):
        result = real(*positional, **keywords)
        calls.append((positional, result))
        return result
    monkeypatch.setattr(owner, name, recorded)
    return calls


def test_every_epoch_has_its_own_order_and_the_seed_sets_it(tiny_data, tmp_path, monkeypatch):
    calls, orders = record_calls(monkeypatch, train.Trainer, "batches"), {}
    for seed in (0, 1):
        assert train.main(args(tiny_data, tmp_path / f"s{seed}", "--epochs", "2", "--seed", seed)) == 0
        orders[seed] = {epoch: batches for (_, epoch), batches in calls[-2:]}  # [[index, ...], ...]
        assert sorted(i for batch in orders[seed][0] for i in batch) == list(range(24))  # every image once
    assert orders[0][0] != orders[0][1]  # epoch 2 is shuffled again
    assert orders[0][0] != orders[1][0]  # another seed, another order


def test_grad_clip_clips_every_step_at_its_norm(tiny_data, tmp_path, monkeypatch):
    calls = record_calls(monkeypatch, torch.nn.utils, "clip_grad_norm_")
    assert train.main(args(tiny_data, tmp_path / "off", "--epochs", "1")) == 0
    assert calls == []  # grad_clip null: no clipping
    assert train.main(args(tiny_data, tmp_path / "on", "--epochs", "1", "--grad-clip", "0.5")) == 0
    assert [max_norm for (_, max_norm), _ in calls] == [0.5] * 3  # 3 steps


def test_the_sample_grid_comes_from_the_averaged_weights(tiny_data, tmp_path, monkeypatch):
    calls = record_calls(monkeypatch, train, "generate")
    out = tmp_path / "out"
    assert train.main(args(tiny_data, out, "--epochs", "1", "--samples-per-class", "2")) == 0
    assert os.path.isfile(out / "samples_epoch0001.png") and len(calls) == 1
    state = load_checkpoint(str(out / "last.pt"))  # saved after the grid, with no step between
    assert_same_tensors(calls[0][0][0].state_dict(), state["ema"])  # the EMA's weights, not the raw ones
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["ema"])


def test_the_weight_average_warms_up_before_its_decay():
    """Update n moves the average by 1 - min(decay, (1 + n) / (10 + n)) of the way to the weights:
    0.9 at the first update, then less, down to 1 - decay."""
    update = train.ema_multi_avg_fn(0.99)
    for n, moved in ((0, 0.9), (10, 1 - 11 / 20), (10_000, 0.01)):
        average = [torch.zeros(3)]
        update(average, [torch.ones(3)], torch.tensor(n))
        assert torch.allclose(average[0], torch.full((3,), moved)), n


def test_every_step_mirrors_with_its_own_seed(tiny_data, tmp_path, monkeypatch):
    """Augmentation seeds come from (seed, step, rank): each step draws other flips, and a run
    with the same seed draws the same ones."""
    calls = record_calls(monkeypatch, dataset, "random_hflip")
    for run in ("a", "b"):
        assert train.main(args(tiny_data, tmp_path / run, "--epochs", "2", "--hflip")) == 0
    seeds = [seed for (_, seed), _ in calls]
    assert len(seeds) == 12 and len(set(seeds[:6])) == 6 and seeds[:6] == seeds[6:]
