"""FID (Frechet Inception distance) between generated images and a reference set, pooled and per class.

Features come from pytorch-fid's Inception network with the FID weights (inception_extractor), or
from any extractor passed in instead (the tests pass a tiny network): a module that maps float
images in [0, 1], [B, 3, H, W], to features [B, D]. The distance is pytorch-fid's.

A reference set is a folder of ClassK/ subfolders (per class and pooled; in another sample.py
output, only the images its samples.json lists), a CPEN455-layout root with <split>.csv (per
class from its labels), or a plain folder of images (pooled only); its images are resized to the
model's image size, as for training. With no more images in a set than feature dimensions, the
covariance is singular and FID biased upward: compute_fid warns.
"""
import os
import socket
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from config import UsageError
from dataset import (DataError, class_name, item_paths, list_image_folder, load_images,
                     read_class_folders, read_split_csv, split_csv_path)

# pytorch-fid's four feature blocks (pytorch_fid.inception.InceptionV3): the layers of
# torchvision's Inception3 in each, by the number of channels of the block's output.
INCEPTION_BLOCKS = {
    64: ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1"],
    192: ["Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2"],
    768: ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
    2048: ["Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"],
}
FID_DIMS = tuple(INCEPTION_BLOCKS)


class FIDWeightsError(UsageError):
    """The Inception weights for FID cannot be had; the message says how to supply them."""


# ---------------------------------------------------------------------------------------------
# Features.

@torch.inference_mode()
def extract_features(images, extractor, batch_size=50, device="cpu"):
    """uint8 images [N, 3, H, W] -> features [N, D] float64. `extractor` maps float images in
    [0, 1] [B, 3, H, W] to [B, D] (or [B, D, 1, 1]), as pytorch-fid's Inception wrapper does."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float() / 255.0
        out.append(extractor(x).reshape(len(x), -1).double().cpu())
    return torch.cat(out).numpy()


class InceptionFeatures(torch.nn.Module):
    """pytorch-fid's InceptionV3 as an extractor, [B, 3, H, W] in [0, 1] -> [B, dims]: the images
    resized to 299x299 and scaled to [-1, 1], the blocks up to the one with `dims` channels, and
    its maps average-pooled, as pytorch_fid.fid_score.get_activations does."""

    def __init__(self, inception, dims):
        super().__init__()
        names = [name for d in FID_DIMS if d <= dims for name in INCEPTION_BLOCKS[d]]
        self.layers = torch.nn.Sequential(*(getattr(inception, name) for name in names))

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.layers(2 * x - 1)  # [B, dims, h, w]
        return F.adaptive_avg_pool2d(feats, (1, 1)).flatten(1)


def fid_inception(state):
    """The network of pytorch_fid.inception.fid_inception_v3 with the weights `state`; that
    function fetches its weights from the internet itself, so it is rebuilt here from its parts."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    net.load_state_dict(state)
    return net


def inception_extractor(dims=2048, weights=None, device="cpu"):
    """pytorch-fid's InceptionV3 (FID weights) returning `dims` features, built from a local
    weights file (see inception_weights_path) without any other download."""
    if dims not in INCEPTION_BLOCKS:
        raise UsageError(f"--fid-dims must be one of {FID_DIMS}, got {dims}")
    path = inception_weights_path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FIDWeightsError(f"{path}: not a loadable weights file ({short_reason(err)})") from None
    if not isinstance(state, dict):
        raise FIDWeightsError(f"{path}: not a state_dict of pytorch-fid's Inception")
    try:
        net = fid_inception(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise FIDWeightsError(f"{path}: not pytorch-fid's Inception weights ({short_reason(err)})") from None
    return InceptionFeatures(net, dims).to(device).eval()


def inception_weights_path(weights=None):
    """The local file of pytorch-fid's Inception weights: `weights` if given, else torch hub's
    cache, downloading it there when missing. FIDWeightsError (saying how to supply them) otherwise."""
    from pytorch_fid.inception import FID_WEIGHTS_URL
    if weights is not None:
        if not os.path.isfile(weights):
            raise FIDWeightsError(f"--fid-weights file not found: {weights}")
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    if os.path.isfile(cached):
        return cached
    print(f"downloading pytorch-fid's Inception weights to {cached}", flush=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached, progress=False)
    except Exception as err:  # offline: URLError, timeouts, HTTP errors, ...
        raise FIDWeightsError(
            f"cannot download pytorch-fid's Inception weights ({short_reason(err)}); on a machine with "
            f"internet fetch {FID_WEIGHTS_URL}, then pass --fid-weights PATH or copy it to {cached}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return cached


def short_reason(err):
    """An exception as at most 160 characters on one line, for a one-line error message."""
    return " ".join(str(err).split())[:160] or type(err).__name__


# ---------------------------------------------------------------------------------------------
# Reference sets and the distance.

def reference_set(ref_dir, split, num_classes, image_size, classes=None):
    """(uint8 images [N, 3, S, S], labels [N] with -1 for unknown) of a FID reference folder:
    ClassK/ subfolders, a CPEN455 root with <split>.csv, or a plain folder (see the module doc).
    With known labels, only the rows of `classes` (class indices; None = all) are kept."""
    if not os.path.isdir(ref_dir):
        raise DataError(f"--fid-ref folder not found: {ref_dir}")
    class_folders, _ = read_class_folders(ref_dir, num_classes)
    paths, labels = [], []
    if class_folders:
        for k, files in class_folders:
            paths += files
            labels += [k] * len(files)
    elif os.path.isfile(split_csv_path(ref_dir, split)):
        csv_path = split_csv_path(ref_dir, split)
        items = read_split_csv(ref_dir, csv_path, num_classes=num_classes or None)
        paths, labels = item_paths(ref_dir, csv_path, items), [label for _, label in items]
    else:
        items = list_image_folder(ref_dir)
        paths, labels = item_paths(ref_dir, None, items), [-1] * len(items)
    labels = np.asarray(labels, dtype=np.int64)
    if classes is not None and (labels >= 0).all():
        keep = np.isin(labels, list(classes))
        if not keep.any():
            raise DataError(f"--fid-ref {ref_dir}: no reference images of the drawn classes")
        paths, labels = [p for p, k in zip(paths, keep) if k], labels[keep]
    return load_images(paths, image_size), labels


def fid_from_features(feats_a, feats_b):
    """The Frechet distance between Gaussians fitted to two feature sets [N, D] (N >= 2 each),
    computed by pytorch_fid.fid_score.calculate_frechet_distance."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy's sqrtm(disp=...) in pytorch-fid
        return float(calculate_frechet_distance(mu_a, cov_a, mu_b, cov_b))


def compute_fid(gen_feats, gen_labels, ref_feats, ref_labels, dims=None):
    """FID pooled and per class, from features [N, D] and labels [N] (class indices, -1 unknown).

    Returns (results {"pooled" | "ClassK": {"fid", "n_generated", "n_reference"}}, warning lines).
    Per-class scores need a labelled reference; a class gets one when both sets have at least 2
    of its images. A warning names every set with no more images than feature dimensions."""
    gen_labels, ref_labels = np.asarray(gen_labels), np.asarray(ref_labels)
    dims = gen_feats.shape[1] if dims is None else dims
    groups = [("pooled", np.ones(len(gen_labels), bool), np.ones(len(ref_labels), bool))]
    if (ref_labels >= 0).any():
        groups += [(class_name(k), gen_labels == k, ref_labels == k)
                   for k in sorted(set(gen_labels.tolist()) - {-1})]
    results, few, skipped = {}, [], []
    for name, gen_mask, ref_mask in groups:
        n_gen, n_ref = int(gen_mask.sum()), int(ref_mask.sum())
        counts = f"{name} ({n_gen} generated, {n_ref} reference)"
        if n_gen < 2 or n_ref < 2:
            skipped.append(counts)
            continue
        results[name] = {"fid": fid_from_features(gen_feats[gen_mask], ref_feats[ref_mask]),
                         "n_generated": n_gen, "n_reference": n_ref}
        if min(n_gen, n_ref) <= dims:
            few.append(counts)
    messages = []
    if few:
        smaller = [str(d) for d in FID_DIMS if d < dims]
        messages.append(
            f"warning: FID on no more images than its {dims} feature dimensions: {'; '.join(few)}. "
            "The covariance is singular, so the score is biased upward and not comparable across "
            f"sample sizes; use more than {dims} images per set"
            + (f" or a smaller --fid-dims ({', '.join(smaller)})" if smaller else ""))
    if skipped:
        messages.append(f"warning: no FID for {'; '.join(skipped)}: it needs at least 2 images per set")
    return results, messages
