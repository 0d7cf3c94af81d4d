"""bench/plot_curves.py: a run and its resumed continuation read as one curve, in order; a file
that is not train.py's metrics.jsonl exits 2 with one line; the plot is a PNG (where matplotlib
is installed: the project does not depend on it)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # appended: bench/sampling.py must not shadow sampling.py

import plot_curves  # noqa: E402


def write_metrics(path, epochs, seconds_per_epoch=60):
    with open(path, "w") as f:
        for epoch in epochs:
            f.write(json.dumps({"epoch": epoch, "train_bpd": 5 - epoch / 10, "val_bpd": 5 - epoch / 9,
                                "val_acc": epoch / 10, "seconds": epoch * seconds_per_epoch}) + "\n")
    return str(path)


def test_a_run_and_its_continuation_read_as_one_curve(tmp_path):
    first = write_metrics(tmp_path / "run.jsonl", [1, 2, 3])
    resumed = write_metrics(tmp_path / "resumed.jsonl", [4, 5])
    rows = plot_curves.read_metrics([first, resumed])
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]


def test_a_plot_is_written_as_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curve.png"
    assert plot_curves.main([write_metrics(tmp_path / "m.jsonl", [1, 2]), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_bad_metrics_exit_2_with_one_line(tmp_path, capsys):
    not_json = write_metrics(tmp_path / "not.jsonl", [1])
    with open(not_json, "a") as f:
        f.write("{oops\n")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"epoch": 1, "seconds": 3}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = {str(tmp_path / "missing.jsonl"): "cannot read", not_json: "line 2: not JSON",
             str(foreign): "line 1: no 'train_bpd'", str(empty): "no evaluations"}
    for path, message in cases.items():
        out = tmp_path / "curve.png"
        assert plot_curves.main([path, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists()
