"""bench/test_time_views.py: translations move the pixels and reflect the edges, and the accuracy
of a view set is that of classify.py on the same views ("id" alone, and "id+flip" as --hflip),
and each dropout mask is one sub-network that every label of an image shares."""
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
sys.path.append(os.path.join(ROOT, "bench"))  # appended: bench/sampling.py must not shadow sampling.py

import test_time_views  # noqa: E402
from classify import score_images  # noqa: E402
from conftest import randomize_label_parameters  # noqa: E402
from model import build_model  # noqa: E402
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
    views = subprocess.run([run[0], os.path.join(ROOT, "bench", "test_time_views.py"), *run[1:],
                            "--dropout-masks", "2"],
                           capture_output=True, text=True, check=True, env=ENV, timeout=300).stdout
    n = len((cpen_root / "val.csv").read_text().splitlines())
    for view_set, flags in (("id", []), ("id+flip", ["--hflip"])):
        metrics = str(tmp_path / f"{view_set}.json")
        subprocess.run([run[0], os.path.join(ROOT, "classify.py"), *run[1:], "--out", str(tmp_path / "p.csv"),
                        "--metrics-out", metrics, "--no-progress", *flags], capture_output=True, check=True,
                       env=ENV, timeout=300)
        with open(metrics) as f:
            right = json.load(f)["accuracy"] * n
        assert accuracy_of(views, view_set) == round(right)
    assert all(view_set in views for view_set in test_time_views.VIEW_SETS)
    # the fixture trained without dropout: every mask is the network itself
    assert all(accuracy_of(views, row) == accuracy_of(views, "id")
               for row in ("one mask", "masks (mean)", "masks (mixture)"))


def test_a_dropout_mask_is_shared_by_every_label_of_an_image():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    model = build_model({"nr_filters": 8, "nr_resnet": 1, "num_classes": 3, "image_size": 8, "dropout": 0.5})
    with torch.no_grad():
        model.label_embedding.weight.zero_()  # the label now changes nothing but the mask could
    masked = test_time_views.score_under_masks(model.eval(), images, 3, masks=2, batch_size=4, device="cpu")
    assert masked.shape == (2, 5, 3)
    assert np.array_equal(masked, np.repeat(masked[..., :1], 3, axis=2))  # one mask for all labels
    assert not np.allclose(masked[0], masked[1], rtol=0, atol=1e-3)  # two masks, two sub-networks
    assert not model.training  # left in eval mode, as classify.py scores


def test_without_dropout_every_mask_is_the_network_itself():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    model = build_model({"nr_filters": 8, "nr_resnet": 1, "num_classes": 3, "image_size": 8, "dropout": 0.0,
                         "block_conditioning": "bias"})
    randomize_label_parameters(model, std=1.0).eval()
    masked = test_time_views.score_under_masks(model, images, 3, masks=2, batch_size=4, device="cpu")
    plain, _ = score_images(model, images, 3, batch_size=5, device="cpu", progress=False)
    assert np.ptp(plain, axis=1).min() > 1e-2  # every image scores differently under each label
    assert np.allclose(masked, np.stack([plain, plain]), rtol=0, atol=1e-3)  # label by label


def test_the_view_sets_hold_the_views_they_name():
    shifts = {d: {(d, 0), (-d, 0), (0, d), (0, -d)} for d in (1, 2)}
    expected = {"id": {"id"}, "id+flip": {"id", "flip"}, "id+shift1": {"id"} | shifts[1],
                "id+shift2": {"id"} | shifts[2], "id+flip+shift1": {"id", "flip"} | shifts[1],
                "id+shift1+shift2": {"id"} | shifts[1] | shifts[2], "all": {"id", "flip"} | shifts[1] | shifts[2]}
    assert {name: set(views) for name, views in test_time_views.VIEW_SETS.items()} == expected
    assert all(len(views) == len(set(views)) for views in test_time_views.VIEW_SETS.values())  # no view twice
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    assert torch.equal(test_time_views.view(images, "flip")[..., 0], images[..., -1])  # left-right mirror
    assert torch.equal(test_time_views.view(images, "flip")[..., 0, :], images[..., 0, :].flip(-1))


def test_rows_average_the_views_and_combine_the_masks_by_mean_and_by_mixture(monkeypatch, capsys):
    """Fake log-likelihoods where the mean of views, their max, one mask, the masks' mean and
    their log-mean-exp each give a different accuracy."""
    labels = [1, 0, 0, 0, 0]
    by_view = {"id": [[0.0, -10.0]] * 5, "flip": [[-100.0, -1.0]] * 5}  # mean -> class 1, max -> class 0
    under_masks = [[[0.0, -5.0], [-100.0, -6.0]]] * 3 + [[[-1.0, 0.0], [0.0, -5.0]]] * 2  # per image, per mask
    masked = np.array(under_masks, dtype=np.float64).transpose(1, 0, 2)  # [masks 2, images 5, K 2]
    model = types.SimpleNamespace(config={"num_classes": 2, "image_size": 4})
    monkeypatch.setattr(test_time_views, "load_model", lambda path, device: (model, None))
    items = [(f"train/{i}.jpg", y) for i, y in enumerate(labels)]
    monkeypatch.setattr(test_time_views, "read_split_csv", lambda root, csv, num_classes, allow_unknown: items)
    images = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    monkeypatch.setattr(test_time_views, "load_images", lambda paths, size: images)
    monkeypatch.setattr(test_time_views, "speed_up_cpu", lambda: None)
    monkeypatch.setattr(test_time_views, "view", lambda images, name: name)
    monkeypatch.setattr(test_time_views, "score_images",
                        lambda m, name, K, bs, dev: (np.array(by_view.get(name, [[0.0, 0.0]] * 5)), None))
    monkeypatch.setattr(test_time_views, "score_under_masks", lambda m, images, K, masks, bs, dev: masked[:masks])
    monkeypatch.setattr(sys, "argv", ["test_time_views.py", "--checkpoint", "c.pt", "--data-dir", ".",
                                      "--csv", "v.csv", "--dropout-masks", "2"])
    test_time_views.main()
    out = capsys.readouterr().out
    assert accuracy_of(out, "id") == 4 and accuracy_of(out, "id+flip") == 1  # the mean of the views
    assert accuracy_of(out, "one mask") == 2  # the first mask alone
    assert accuracy_of(out, "masks (mean)") == 3  # the product of the sub-networks
    assert accuracy_of(out, "masks (mixture)") == 4  # log-mean-exp
