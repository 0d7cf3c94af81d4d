"""fid.py: the Frechet distance against a direct computation, features with a stand-in extractor,
reference sets, the warnings, and the Inception extractor against pytorch-fid's own."""
import json
import os
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from pytorch_fid import inception as fid_inception

import fid
from dataset import SAMPLES_RECORD, class_name, list_image_folder, load_images, sample_file_name

K = 3
SIZE = 8


class StandIn(torch.nn.Module):
    """A tiny fixed random conv net: float images in [0, 1] [B, 3, H, W] -> [B, 4] features."""

    def __init__(self, dims=4):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.fc = torch.nn.Linear(6, dims)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def frechet_direct(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), written independently of fid.py."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root).real)


def features_of_folder(folder, extractor):
    files = [os.path.join(folder, i) for i, _ in list_image_folder(str(folder))]
    with torch.no_grad():
        return extractor(load_images(files, SIZE).float() / 255).double().numpy()


def write_folder(folder, n, seed, base):
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = np.clip(rng.normal(base, 60, (16, 16, 3)), 0, 255).astype(np.uint8)  # resized to 8
        Image.fromarray(arr).save(os.path.join(folder, f"ref{i:03d}.png"))


def random_inception_weights(seed=0):
    """A state_dict of pytorch-fid's FID Inception with random weights (the real ones are not
    on these machines), built by pytorch-fid's own fid_inception_v3 with its loading stubbed out."""
    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None):
        torch.manual_seed(seed)
        return fid_inception.fid_inception_v3().state_dict()


def test_fid_from_features_matches_direct():
    rng = np.random.RandomState(0)
    a, b = rng.normal(0, 1, (40, 5)), rng.normal(0.3, 1.2, (30, 5))
    assert fid.fid_from_features(a, b) == pytest.approx(frechet_direct(a, b), rel=1e-6)
    assert fid.fid_from_features(a, a) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        fid.fid_from_features(a[:1], b)


def test_fid_on_two_folders_with_stand_in(tmp_path):
    extractor = StandIn()
    write_folder(tmp_path / "a", 12, seed=1, base=90)
    write_folder(tmp_path / "b", 10, seed=2, base=150)
    fa, fb = features_of_folder(tmp_path / "a", extractor), features_of_folder(tmp_path / "b", extractor)
    images_a, labels_a = fid.reference_set(str(tmp_path / "a"), "train", K, SIZE)
    images_b, labels_b = fid.reference_set(str(tmp_path / "b"), "train", K, SIZE)
    assert (labels_a == -1).all() and len(images_a) == 12
    feats_a = fid.extract_features(images_a, extractor, batch_size=5)
    feats_b = fid.extract_features(images_b, extractor, batch_size=5)
    np.testing.assert_allclose(feats_a, fa, rtol=1e-6, atol=1e-6)
    results, messages = fid.compute_fid(feats_a, labels_a, feats_b, labels_b)
    assert list(results) == ["pooled"] and not messages
    assert results["pooled"]["fid"] == pytest.approx(frechet_direct(fa, fb), rel=1e-5)
    assert results["pooled"]["fid"] > 0.01


def test_fid_warns_with_few_images():
    rng = np.random.RandomState(0)
    gen, ref = rng.normal(size=(9, 8)), rng.normal(size=(30, 8))
    results, messages = fid.compute_fid(gen, [0] * 3 + [1] * 6, ref, [0] * 20 + [1] * 10, dims=8)
    assert set(results) == {"pooled", "Class0", "Class1"}
    assert len(messages) == 1 and "singular" in messages[0]
    assert "Class0 (3 generated, 20 reference)" in messages[0] and "Class1 (6 generated" in messages[0]
    assert "pooled" not in messages[0]  # 9 generated > 8 dims
    _, messages = fid.compute_fid(gen[:8], [-1] * 8, ref, [-1] * 30, dims=8)
    assert messages and "pooled (8 generated, 30 reference)" in messages[0]  # 8 images span 7 dimensions
    _, messages = fid.compute_fid(gen, [0] * 8 + [2], ref, [0] * 30, dims=8)
    assert any("no FID for Class2" in m for m in messages)


def test_reference_set_from_cpen455_csv(tmp_path):
    root = tmp_path / "cpen"
    write_folder(root / "train", 6, seed=3, base=100)
    names = sorted(os.listdir(root / "train"))
    labels = [0, 1, 2, 0, 1, 2]
    (root / "train.csv").write_bytes("".join(f"train/{n},{l}\r\n" for n, l in zip(names, labels)).encode())
    images, got = fid.reference_set(str(root), "train", K, SIZE)
    assert images.shape == (6, 3, SIZE, SIZE) and got.tolist() == labels
    images, got = fid.reference_set(str(root), "train", K, SIZE, classes=[2])
    assert got.tolist() == [2, 2]


def test_reference_set_from_another_sample_py_output_takes_the_images_it_recorded(tmp_path):
    root = tmp_path / "samples"
    for k in range(K):  # an earlier run: 3 images per class
        write_folder(root / class_name(k), 3, seed=k, base=50 + 50 * k)
    for k in range(K):  # as sample.py names them
        for i, name in enumerate(sorted(os.listdir(root / class_name(k)))):
            os.rename(root / class_name(k) / name, root / class_name(k) / sample_file_name(i))
    images, labels = fid.reference_set(str(root), "train", K, SIZE)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    (root / SAMPLES_RECORD).write_text(json.dumps({"classes": [1], "n_per_class": 2}))  # a later, smaller run
    recorded, labels = fid.reference_set(str(root), "train", K, SIZE)
    assert labels.tolist() == [1, 1] and torch.equal(recorded, images[3:5])


def test_inception_extractor_equals_pytorch_fid(tmp_path):
    """The extractor built from a local weights file (no download, no patching) gives, at every
    feature size, what pytorch-fid's own InceptionV3 with those weights gives, pooled as
    pytorch_fid.fid_score.get_activations pools."""
    state = random_inception_weights()
    weights = tmp_path / "inception.pth"
    torch.save(state, weights)
    x = torch.rand(1, 3, SIZE, SIZE)
    for dims in fid.FID_DIMS:
        with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
            reference = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
        with torch.inference_mode():
            expected = torch.nn.functional.adaptive_avg_pool2d(reference(x)[0], (1, 1)).flatten(1)
            got = fid.inception_extractor(dims, str(weights))(x)
        assert got.shape == (1, dims) and torch.equal(got, expected), dims


def test_inception_extractor_refuses_other_weights(tmp_path):
    bogus = tmp_path / "bogus.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bogus)
    for bad, needle in ((bogus, "bogus.pth"), (tmp_path / "absent.pth", "absent.pth")):
        with pytest.raises(fid.FIDWeightsError, match=needle):
            fid.inception_extractor(64, str(bad))
