"""Atomic writes, checkpoints that cannot run code, rebuilding a model, the RNG state, and the shipped checkpoints."""
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import (CheckpointError, Progress, atomic_write, for_inference, load_checkpoint,
                        model_from_checkpoint, remove_cut_short_writes, restore_rng,
                        restore_training_state, rng_state, save_checkpoint, seed_everything,
                        training_state)
from checkpoint import main as checkpoint_main
from classify import score_images
from config import validation_seed
from conftest import randomize_label_parameters
from dataset import item_paths, read_split_csv, split_train_val
from model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_ROOT = os.path.join(REPO, "..", "shared", "data", "cpen455")

TINY = dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0, image_size=8,
            num_classes=3, embedding_dim=4, block_conditioning="film")


def test_checkpoint_round_trips_bit_for_bit_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = randomize_label_parameters(build_model(TINY)).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x, torch.tensor([0, 2])).detach(), tmp_path / "expected.pt")
    save_checkpoint(tmp_path / "model.pt", {"model": model.state_dict(), "ema": None,
                                            "config": TINY, "epoch": 1, "step": 10})
    script = (
        "import sys, torch; sys.path.insert(0, '.'); torch.set_num_threads(1);"  # as this process
        "from checkpoint import load_checkpoint, model_from_checkpoint;"
        f"d = '{tmp_path}';"
        "m = model_from_checkpoint(load_checkpoint(d + '/model.pt'));"
        "torch.save(m(torch.load(d + '/x.pt'), torch.tensor([0, 2])).detach(), d + '/got.pt')"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=REPO)
    assert torch.equal(torch.load(tmp_path / "got.pt"), torch.load(tmp_path / "expected.pt"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_a_write_cut_short_leaves_the_old_file_and_its_temp_file_is_cleaned_up(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def half_then_fail(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]
    # a process killed in the middle of the write cannot clean up: its temp file stays ...
    script = ("import os, sys; sys.path.insert(0, '.'); from checkpoint import atomic_write;"
              f"atomic_write({str(path)!r}, lambda f: (f.write(b'half'), f.flush(), os._exit(9)))")
    assert subprocess.run([sys.executable, "-c", script], timeout=120, cwd=REPO).returncode == 9
    assert torch.load(path, weights_only=True)["step"] == 1 and len(os.listdir(tmp_path)) == 2
    remove_cut_short_writes(tmp_path)  # ... until the next run in that folder starts
    assert os.listdir(tmp_path) == ["last.pt"]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_write_through_a_link_replaces_the_file_it_names_and_keeps_the_link(tmp_path):
    (tmp_path / "kept").mkdir()
    target, link = tmp_path / "kept" / "p.csv", tmp_path / "p.csv"
    target.write_text("old\n")
    os.symlink(target, link)
    atomic_write(str(link), lambda f: f.write(b"new\n"))
    assert os.path.islink(link) and target.read_text() == "new\n"
    assert os.listdir(tmp_path / "kept") == ["p.csv"]  # no temp file left beside it


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": TINY, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="holds a Python object, print, which could run code") as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)  # one plain line
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")
    for name, content in [("junk.pt", b"not a checkpoint at all"), ("hello.pt", b"hello"), ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)


def test_model_from_checkpoint_prefers_ema(tmp_path):
    torch.manual_seed(0)
    model, ema = build_model(TINY), build_model(TINY)
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "ema": ema.state_dict(), "config": TINY})
    state = load_checkpoint(tmp_path / "c.pt")
    x, y = torch.zeros(1, 3, 8, 8), torch.tensor([1])
    assert torch.equal(model_from_checkpoint(state)(x, y), ema.eval()(x, y))
    assert torch.equal(model_from_checkpoint(state, weights="model")(x, y), model.eval()(x, y))


def tiny_training_state():
    """-> (the model, a training_state() dict after one Adam step, with a fitted temperature)."""
    torch.manual_seed(0)
    model = build_model(TINY)
    ema = torch.optim.swa_utils.AveragedModel(model)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.99)
    model(torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([0, 1])).sum().backward()
    optimizer.step()
    ema.update_parameters(model)
    config = {**TINY, "best_metric": "val_bpd"}
    progress = Progress(epoch=1, step=1, temperature=7.5)
    return model, training_state(model, ema, optimizer, scheduler, config, progress, rng_state(), None, 1)


def test_a_checkpoint_for_inference_drops_what_only_resuming_needs(tmp_path):
    model, state = tiny_training_state()
    save_checkpoint(tmp_path / "last.pt", state)
    save_checkpoint(tmp_path / "shipped.pt", for_inference(state))
    shipped = load_checkpoint(tmp_path / "shipped.pt")
    assert os.path.getsize(tmp_path / "shipped.pt") < 0.6 * os.path.getsize(tmp_path / "last.pt")
    assert shipped["temperature"] == 7.5 and shipped["config"] == state["config"]
    assert not {"optimizer", "scheduler", "rng", "rng_per_rank"} & set(shipped)
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([2, 0])
    for weights in ("ema", "model"):
        assert torch.equal(model_from_checkpoint(shipped, weights)(x, y),
                           model_from_checkpoint(state, weights)(x, y))
    with pytest.raises(CheckpointError, match="cannot resume from it.*'optimizer'.*classify/sample"):
        restore_training_state(shipped, model, None, None, None, "shipped.pt")


def test_a_resume_restores_each_process_rng_where_the_number_of_processes_allows():
    """A run on as many processes continues each one's RNG; a single process continues rank 0's;
    any other number keeps the fresh seeds that training set before the resume."""
    def stream(seed):
        seed_everything(seed)
        return rng_state(), torch.rand(3)

    (rank0, after0), (rank1, after1), (_, fresh) = stream(10), stream(11), stream(12)
    two_processes = {"rng": rank0, "rng_per_rank": [rank0, rank1]}
    one_process = {"rng": rank0, "rng_per_rank": None}
    for state, rank, world_size, expected in [(two_processes, 1, 2, after1), (two_processes, 0, 1, after0),
                                              (one_process, 0, 1, after0), (one_process, 1, 2, fresh),
                                              (two_processes, 2, 3, fresh)]:
        seed_everything(12)
        restore_rng(state, rank, world_size)
        assert torch.equal(torch.rand(3), expected), (rank, world_size)


def test_the_checkpoint_command_writes_the_copy_and_refuses_to_overwrite_its_source(tmp_path):
    _, state = tiny_training_state()
    save_checkpoint(tmp_path / "last.pt", state)

    def run(*argv):
        return subprocess.run([sys.executable, os.path.join(REPO, "checkpoint.py"), *map(str, argv)],
                              capture_output=True, text=True, timeout=120)
    done = run(tmp_path / "last.pt", tmp_path / "out" / "shipped.pt")
    assert done.returncode == 0 and "wrote" in done.stdout
    assert "optimizer" not in load_checkpoint(tmp_path / "out" / "shipped.pt")
    for argv, error in [((tmp_path / "last.pt", tmp_path / "last.pt"), "is the same file as source"),
                        ((tmp_path / "none.pt", tmp_path / "x.pt"), "checkpoint not found"),
                        ((tmp_path, tmp_path / "x.pt"), "is a folder; name a checkpoint file in it")]:
        refused = run(*argv)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
        assert error in refused.stderr
    assert "optimizer" in load_checkpoint(tmp_path / "last.pt")


def test_an_averaged_only_copy_keeps_the_weights_that_classify_and_sample_use_at_half_the_size(tmp_path):
    _, state = tiny_training_state()
    # Raw weights apart from their average (after one step the average is a copy of them).
    state["model"] = {name: weights + 0.01 for name, weights in state["model"].items()}
    save_checkpoint(tmp_path / "last.pt", state)
    assert checkpoint_main([str(tmp_path / "last.pt"), str(tmp_path / "both.pt")]) == 0
    assert checkpoint_main([str(tmp_path / "last.pt"), str(tmp_path / "ema.pt"), "--averaged-only"]) == 0
    both, averaged = load_checkpoint(tmp_path / "both.pt"), load_checkpoint(tmp_path / "ema.pt")
    assert "ema" not in averaged and averaged["temperature"] == both["temperature"]
    assert os.path.getsize(tmp_path / "ema.pt") < 0.6 * os.path.getsize(tmp_path / "both.pt")
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([2, 0])
    assert not torch.equal(model_from_checkpoint(both, "model")(x, y), model_from_checkpoint(both, "ema")(x, y))
    for weights in ("ema", "model"):  # either way, the averaged weights
        assert torch.equal(model_from_checkpoint(averaged, weights)(x, y), model_from_checkpoint(both, "ema")(x, y))


def test_the_checkpoint_command_can_take_the_calibration_of_another_checkpoint(tmp_path):
    """A final model that trained on its validation images ships with the temperature and prior
    fitted on them while they were held out; from an uncalibrated or another network, it refuses."""
    _, state = tiny_training_state()
    save_checkpoint(tmp_path / "final.pt", {**state, "temperature": 2.0, "fitted_prior": None})
    prior = {"temperature": 7.0, "log_prior": [-1.0, -2.0, -1.5, -1.2]}
    save_checkpoint(tmp_path / "held_out.pt", {**state, "fitted_prior": prior})
    save_checkpoint(tmp_path / "uncalibrated.pt", {**state, "temperature": None})
    assert checkpoint_main([str(tmp_path / "final.pt"), str(tmp_path / "shipped.pt"),
                            "--calibration-from", str(tmp_path / "held_out.pt")]) == 0
    shipped = load_checkpoint(tmp_path / "shipped.pt")
    assert shipped["temperature"] == 7.5 and shipped["fitted_prior"] == prior
    assert all(torch.equal(shipped["ema"][name], weights) for name, weights in state["ema"].items())
    assert checkpoint_main([str(tmp_path / "final.pt"), str(tmp_path / "x.pt"),
                            "--calibration-from", str(tmp_path / "uncalibrated.pt")]) == 2
    wider = {**state, "config": {**state["config"], "nr_filters": state["config"]["nr_filters"] * 2}}
    save_checkpoint(tmp_path / "wider.pt", wider)  # another network: its temperature does not fit
    assert checkpoint_main([str(tmp_path / "final.pt"), str(tmp_path / "x.pt"),
                            "--calibration-from", str(tmp_path / "wider.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("name", ["demo.pt", "cpen455.pt"])
def test_the_shipped_checkpoints_load_safely_fit_the_size_limit_and_carry_a_temperature(name):
    path = os.path.join(REPO, "checkpoints", name)
    assert os.path.getsize(path) <= 25 * 2 ** 20
    state = load_checkpoint(path)  # weights_only=True
    model = model_from_checkpoint(state)
    assert model.config["num_classes"] == 4 and model.config["image_size"] == 32
    assert state["temperature"] > 1  # fitted on held-out images: the raw posterior is overconfident


@pytest.mark.skipif(not os.path.isdir(REAL_ROOT), reason="needs ../shared/data/cpen455")
def test_the_shipped_cpen455_model_classifies_real_images_it_never_trained_on():
    csv_path = os.path.join(REAL_ROOT, "train.csv")
    state = load_checkpoint(os.path.join(REPO, "checkpoints", "cpen455.pt"))
    c = state["config"]
    items = read_split_csv(REAL_ROOT, csv_path, 4, allow_unknown=False)
    items = split_train_val(items, c["val_fraction"], validation_seed(c))[1][:8]  # its validation images
    model = model_from_checkpoint(state).eval()
    log_likelihoods, _ = score_images(model, item_paths(REAL_ROOT, csv_path, items), 4, 8, "cpu", progress=False)
    correct = sum(int(ll.argmax() == label) for ll, (_, label) in zip(log_likelihoods, items))
    assert correct >= 6, correct  # 8 of 8 when it shipped
