"""The training config (one table of keys), the command line, and the machine."""
import os
import platform
import subprocess
import sys

import pytest
import yaml

from config import (DEFAULTS, ArgumentParser, UsageError, check_distinct, check_output, first_error, gather_on_main,
                    join_processes, leave_processes, merge_on_resume, parse_duration, parse_training_args,
                    training_parser, validate_config, validation_seed)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def parse(argv):
    """What train.py makes of a command line (without --resume): defaults, then YAML, then flags."""
    from_yaml, from_flags = parse_training_args(training_parser("train.py", ""), argv)
    return validate_config({**DEFAULTS, **from_yaml, **from_flags})


def test_precedence_defaults_yaml_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nlr: 1e-3\nbatch_size: 4\n")
    config = parse(["--config", str(path), "--batch_size", "7", "--max-time=2h", "--amp"])
    assert config["epochs"] == 5 and config["lr"] == 0.001 and config["batch_size"] == 7
    assert config["amp"] is True and config["max_time"] == "2h" and config["nr_resnet"] == 1
    assert parse_duration("45m") == 2700 and parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90 and parse_duration(None) is None
    assert parse_duration("90") == 90 and parse_duration(90) == 90  # a bare number is seconds
    for ambiguous in ("1h30", "2m30"):  # minutes or seconds? one line asks for the unit
        with pytest.raises(UsageError, match="give each number its unit"):
            parse_duration(ambiguous)


def test_a_read_only_output_is_refused_before_the_work(tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("kept\n")
    check_output("--out", mine)  # writable: to be replaced
    mine.chmod(0o444)
    with pytest.raises(UsageError, match="is read-only"):
        check_output("--out", mine)


def test_outputs_must_not_land_on_inputs_or_on_each_other(tmp_path):
    data = tmp_path / "labels.csv"
    data.write_text("a.png,0\n")
    os.symlink(data, tmp_path / "link.csv")
    check_distinct([("--out", tmp_path / "p.csv"), ("--logits", tmp_path / "p.npy"), ("--x", None)],
                   [("--csv", data), ("--checkpoint", None)])
    cases = {"an input": ([("--out", data)], [("--csv", data)]),
             "an input through a link": ([("--out", tmp_path / "link.csv")], [("--csv", data)]),
             "another output, not yet written": ([("--out", tmp_path / "p.csv"), ("--logits", tmp_path / "sub/../p.csv")], [])}
    for name, (outputs, inputs) in cases.items():
        with pytest.raises(UsageError, match="is the same file as"):
            check_distinct(outputs, inputs)


def test_shipped_configs_are_valid():
    with open(os.path.join(REPO, "configs", "demo.yaml")) as f:
        assert yaml.safe_load(f) == DEFAULTS  # the demo config is the embedded default
    for name in ("seed", "cpen455"):
        config = parse(["--config", os.path.join(REPO, "configs", f"{name}.yaml")])
        assert config["num_classes"] == 4 and config["image_size"] == 32
    seed = parse(["--config", os.path.join(REPO, "configs", "seed.yaml")])
    assert (seed["embedding_dim"], seed["block_conditioning"], seed["nr_resnet"], seed["nr_filters"],
            seed["nr_logistic_mix"], seed["batch_size"]) == (32, "none", 2, 160, 10, 16)


def test_the_defaults_are_valid_and_every_key_is_a_flag():
    assert validate_config(DEFAULTS) == DEFAULTS
    help_text = training_parser("train.py", "").format_help()
    for name in DEFAULTS:
        assert f"--{name.replace('_', '-')} " in help_text  # the space: --lr is not --lr-decay
    config = parse(["--data_dir", "x", "--nr-resnet", "2"])  # dashes or underscores
    assert (config["data_dir"], config["nr_resnet"]) == ("x", 2)


def test_values_are_checked_against_the_table():
    assert parse(["--epochs", "3.0", "--lr", "1e-4", "--grad-clip", "null"])["epochs"] == 3
    for argv, message in [(["--epochs", "0"], r"'epochs' must be in \[1, inf\)"),
                          (["--lr-decay", "1.5"], r"'lr_decay' must be in \(0, 1\]"),
                          (["--grad-clip", "0"], r"'grad_clip' must be in \(0, inf\) or null"),
                          (["--amp", "yes please"], "'amp' must be true or false"),
                          (["--nr-filters", "null"], "'nr_filters' cannot be null"),
                          (["--device", "tpu"], "'device' must be one of"),
                          (["--shift", "32"], r"'shift' must be below image_size \(32\)"),
                          (["--max-time", "0"], "max_time must be a positive, finite duration"),
                          (["--max-time", ".nan"], "not a duration")]:
        with pytest.raises(UsageError, match=message):
            parse(argv)


def test_the_validation_split_follows_split_seed_and_else_seed():
    assert validation_seed({"seed": 3, "split_seed": 0}) == 0  # seed replicates share a split
    assert validation_seed({"seed": 3, "split_seed": None}) == 3
    assert validation_seed({"seed": 3}) == 3  # a config from before split_seed


def test_the_hybrid_loss_needs_a_conditional_model():
    with pytest.raises(UsageError, match="cls_loss_weight' needs num_classes > 0"):
        validate_config({**DEFAULTS, "num_classes": 0, "embedding_dim": 0, "cls_loss_weight": 0.01})


def test_text_flags_stay_as_typed():
    """YAML reads 2024 as a number, 'on' as true, 2024-01-05 as a date and '#' as a comment: not
    for a path or a name."""
    config = parse(["--out-dir", "runs/x #1", "--data-dir", "2024-01-05", "--wandb-project", "on",
                    "--train-split", "2024", "--max-time", "null", "--grad-clip", "null"])
    assert (config["out_dir"], config["data_dir"], config["wandb_project"], config["train_split"]) == (
        "runs/x #1", "2024-01-05", "on", "2024")
    assert config["max_time"] is None and config["grad_clip"] is None


def test_flags_are_never_guessed_from_a_prefix(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--lr-dec", "0.9"])
    assert exit_info.value.code == 2 and "--lr-dec" in capsys.readouterr().err
    parser = ArgumentParser(prog="sample.py")  # the other CLIs' parser
    parser.add_argument("--n-per-class", type=int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n-per-clas", "4"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_resuming_keeps_the_stored_config_but_not_a_new_model():
    stored = {**DEFAULTS, "lr": 0.01, "nr_filters": 32}
    merged = merge_on_resume(stored, {"epochs": 20}, "run/last.pt")
    assert merged["lr"] == 0.01 and merged["epochs"] == 20 and merged["resume"] == "run/last.pt"
    with pytest.raises(UsageError, match="'nr_filters' is 16 but the checkpoint run/last.pt"):
        merge_on_resume(stored, {"nr_filters": 16}, "run/last.pt")


def test_a_plain_run_is_process_zero_of_one(monkeypatch):
    """Outside torchrun there is no process group: rank 0 of 1, and a failure is this process's."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    rank, world_size, device = join_processes("cpu")
    assert (rank, world_size, device.type) == (0, 1, "cpu")
    assert first_error(None) is None and first_error("disk full") == "disk full"
    assert gather_on_main({"a": 1}) == [{"a": 1}]
    leave_processes(succeeded=True)  # nothing to leave


def printed_off_and_on(script):
    """-> {"off": words, "on": words}: what `script` prints, run in a fresh process with that argument."""
    return {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                 check=True, cwd=REPO).stdout.split() for mode in ("off", "on")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    """After reuse_freed_memory (the CLIs call it at start), a freed 64 MB block, which glibc
    would unmap on free and map afresh, is reused without page-faulting it in again."""
    script = (
        "import ctypes, resource, sys; sys.path.insert(0, '.'); import config\n"
        "applied = config.reuse_freed_memory() if sys.argv[1] == 'on' else False\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def use(n=64 << 20):\n"
        "    block = libc.malloc(n); ctypes.memset(block, 1, n); libc.free(block)\n"
        "use()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    use()\n"
        "print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() >> 20)"
    )
    words = printed_off_and_on(script)
    faulted = {mode: int(printed[1]) for mode, printed in words.items()}
    assert words["on"][0] == "True" and faulted["off"] >= 256 and faulted["on"] < 4, faulted  # MB faulted in


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="FTZ/DAZ of x86 CPUs")
def test_denormals_count_as_zero_after_speed_up_cpu():
    """After speed_up_cpu (the CLIs call it at start), float32 values below 1.2e-38 are zero in
    arithmetic (their slow path made training 4x slower on an Intel CPU), on the threads of PyTorch's
    pool too: a product over 2^20 elements is split between them. Before, they are kept."""
    script = (
        "import sys, torch; sys.path.insert(0, '.'); import config\n"
        "if sys.argv[1] == 'on':\n"
        "    config.speed_up_cpu()\n"
        "torch.set_num_threads(2)\n"
        "product = torch.full((1 << 20,), 1e-39) * 3.0\n"
        "print(int((product == 0).sum()), int((product != 0).sum()))"
    )
    counts = {mode: tuple(int(n) for n in printed) for mode, printed in printed_off_and_on(script).items()}
    assert counts == {"off": (0, 1 << 20), "on": (1 << 20, 0)}, counts
