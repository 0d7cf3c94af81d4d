"""bench/test_time_views.py: translations move the pixels and reflect the edges, and the accuracy
of a view set is that of classify.py on the same views ("id" alone, and "id+flip" as --hflip)."""
import json
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
sys.path.append(os.path.join(ROOT, "bench"))  # appended: bench/sampling.py must not shadow sampling.py

import test_time_views  # noqa: E402
from test_classify import cpen_root, trained  # noqa: E402,F401  (fixtures)


def test_translate_moves_every_pixel_and_reflects_the_edges():
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    down_left = test_time_views.translate(images, 1, -2)
    assert down_left.dtype == torch.uint8
    assert torch.equal(down_left[:, :, 1:, :4], images[:, :, :5, 2:])  # moved down 1, left 2
    assert torch.equal(down_left[:, :, 1:, 4:], images[:, :, :5, [4, 3]])  # right edge reflected
    assert torch.equal(down_left[:, :, 0], images[:, :, 1, [2, 3, 4, 5, 4, 3]])  # top row: row 1
    assert torch.equal(test_time_views.translate(images, 0, 0), images)


def accuracy_of(printed, view_set):
    return int(re.search(rf"^\s+{re.escape(view_set)}\s+(\d+)/", printed, re.M).group(1))


def test_view_sets_match_classify(trained, cpen_root, tmp_path):
    checkpoint, _ = trained
    run = [sys.executable, "--checkpoint", checkpoint, "--data-dir", str(cpen_root), "--csv",
           str(cpen_root / "val.csv")]
    views = subprocess.run([run[0], os.path.join(ROOT, "bench", "test_time_views.py"), *run[1:]],
                           capture_output=True, text=True, check=True, env=ENV, timeout=300).stdout
    for view_set, flags in (("id", []), ("id+flip", ["--hflip"])):
        metrics = str(tmp_path / f"{view_set}.json")
        subprocess.run([run[0], os.path.join(ROOT, "classify.py"), *run[1:], "--out", str(tmp_path / "p.csv"),
                        "--metrics-out", metrics, "--no-progress", *flags], capture_output=True, check=True,
                       env=ENV, timeout=300)
        with open(metrics) as f:
            right = json.load(f)["accuracy"] * len((cpen_root / "val.csv").read_text().splitlines())
        assert accuracy_of(views, view_set) == round(right)
    assert all(view_set in views for view_set in test_time_views.VIEW_SETS)
