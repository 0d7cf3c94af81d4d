"""Train a conditional PixelCNN++: python train.py [--config configs/X.yaml] [--key value ...]

Every config key is a flag (--data-dir or --data_dir). Values: the defaults below (the demo
setup), then the YAML file, then the command line (parsed as YAML: 3, 1e-3, true, null).
A flag with no value means true (--amp, --resume). Under torchrun it trains with DDP.

Writes <out_dir>/config.yaml, last.pt, best.pt, metrics.jsonl (one line per evaluation) and
samples_epochNNNN.png (one row per class). Exit codes: 0 done (also at max_time), 2 a user
error (bad flag, config or data; one line on stderr), 3 a non-finite loss, 128+N on signal N
(after saving last.pt).
"""
import json
import os
import random
import re
import secrets
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import dataset
from fast_sampler import generate_fast
from layers import data_dependent_init
from model import MODEL_DEFAULTS, build_model, validate_model_config
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, seed_everything
from config import native_bf16, reuse_freed_memory
from utils import bits_per_dim, class_log_likelihoods, discretized_mix_logistic_nll, log_posterior

# The embedded default: the demo setup (configs/demo.yaml holds the same values).
DEFAULTS = {
    # model (see model.MODEL_DEFAULTS)
    "nr_resnet": 1,
    "nr_filters": 16,
    "nr_logistic_mix": 5,
    "dropout": 0.1,
    "num_classes": 4,
    "embedding_dim": 16,
    "block_conditioning": "film",
    "image_size": 32,
    # data
    "data_dir": "data/demo",
    "make_demo_data": True,     # generate the procedural demo set in data_dir if it is not there
    "train_split": "train",     # <data_dir>/<train_split>.csv
    "val_split": "val",         # <data_dir>/<val_split>.csv if it exists, else carve val_fraction
    "val_fraction": 0.1,
    "num_workers": 0,
    "hflip": False,             # mirror each training image left-right with probability 1/2
    # optimisation
    "epochs": 8,
    "batch_size": 32,           # per process
    "eval_batch_size": 64,
    "lr": 0.002,
    "lr_decay": 0.999,          # multiplicative, every step
    "grad_clip": None,          # max gradient norm, or null
    "ema_decay": 0.99,
    "cls_loss_weight": 0.0,     # weight of the cross-entropy of the label posterior (nats/image)
    "cls_batch_size": 0,        # images per batch scored under every label for it (0: all)
    "seed": 0,
    "device": "auto",           # auto | cpu | cuda
    "amp": False,               # bf16 autocast, where the device has native bf16 (CUDA; AVX512-BF16 or AMX CPUs)
    "compile": False,           # torch.compile (minutes of warm-up; no faster on CPUs now: BENCHMARKS.md)
    "channels_last": False,     # channels-last memory format (faster or slower by size: BENCHMARKS.md)
    # schedule of evaluations, checkpoints and samples (in epochs)
    "out_dir": "checkpoints/demo",
    "eval_every": 1,
    "save_every": 1,
    "sample_every": 0,          # 0: a sample grid only at the end of training
    "samples_per_class": 4,     # 0: no sample grids
    "best_metric": "val_acc",   # val_acc (higher is better) or val_bpd (lower is better)
    "max_time": None,           # wall-clock limit of this run: "45m", "2h", "90s", seconds, or null
    "resume": None,             # null, true (<out_dir>/last.pt) or a checkpoint path
    "overwrite": False,         # start afresh even if <out_dir>/last.pt exists
    "wandb": "offline",         # offline | online | disabled (WANDB_MODE=disabled also disables)
    "wandb_project": "pixelcnn-pp",
}
assert set(MODEL_DEFAULTS) <= set(DEFAULTS)

INT_KEYS = {"nr_resnet", "nr_filters", "nr_logistic_mix", "num_classes", "embedding_dim", "image_size",
            "num_workers", "epochs", "batch_size", "cls_batch_size", "eval_batch_size", "seed", "eval_every",
            "save_every", "sample_every", "samples_per_class"}
FLOAT_KEYS = {"dropout", "val_fraction", "lr", "lr_decay", "grad_clip", "ema_decay", "cls_loss_weight"}
BOOL_KEYS = {"make_demo_data", "hflip", "amp", "compile", "channels_last", "overwrite"}
STR_KEYS = {"block_conditioning", "data_dir", "train_split", "val_split", "device", "out_dir",
            "best_metric", "wandb", "wandb_project", "max_time", "resume"}
NULLABLE = {"grad_clip", "val_split", "max_time", "resume"}
CHOICES = {"device": ("auto", "cpu", "cuda"), "best_metric": ("val_acc", "val_bpd"),
           "wandb": ("offline", "online", "disabled")}
# Keys that a resumed run takes from the checkpoint unless given again.
EXIT_USER_ERROR, EXIT_NONFINITE = 2, 3


class ConfigError(Exception):
    """A bad flag, key or value; the message names it."""


# --------------------------------------------------------------------------------------------
# Configuration

def parse_duration(value):
    """'45m', '2h', '90s', '1h30m', '1.5h', a number of seconds, or None -> seconds (or None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", text)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms]?)", "", text).strip():
            raise ConfigError(f"max_time {value!r} is not a duration like '45m', '2h', '90s' or '1h30m'")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit] for n, unit in parts)
    if seconds <= 0:
        raise ConfigError(f"max_time must be positive, got {value!r}")
    return seconds


def coerce(key, value):
    """Check (and gently convert) one config value; ConfigError names the key."""
    if value is None:
        if key in NULLABLE:
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    if key in BOOL_KEYS:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if key in INT_KEYS:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if key in FLOAT_KEYS:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if key == "resume" and isinstance(value, bool):
        return True if value else None
    if key == "max_time" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if key in STR_KEYS:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key {key!r} must be one of {list(CHOICES[key])}, got {value!r}")
        return value
    raise ConfigError(f"unknown config key {key!r}")


def validate_config(config):
    config = {key: coerce(key, value) for key, value in config.items()}
    checks = [
        ("epochs", config["epochs"] >= 1, "must be >= 1"),
        ("batch_size", config["batch_size"] >= 1, "must be >= 1"),
        ("eval_batch_size", config["eval_batch_size"] >= 1, "must be >= 1"),
        ("lr", config["lr"] > 0, "must be > 0"),
        ("lr_decay", 0 < config["lr_decay"] <= 1, "must be in (0, 1]"),
        ("ema_decay", 0 <= config["ema_decay"] < 1, "must be in [0, 1)"),
        ("val_fraction", 0 <= config["val_fraction"] < 1, "must be in [0, 1)"),
        ("cls_loss_weight", config["cls_loss_weight"] >= 0, "must be >= 0"),
        ("cls_batch_size", config["cls_batch_size"] >= 0, "must be >= 0"),
        ("eval_every", config["eval_every"] >= 1, "must be >= 1"),
        ("save_every", config["save_every"] >= 1, "must be >= 1"),
        ("sample_every", config["sample_every"] >= 0, "must be >= 0"),
        ("samples_per_class", config["samples_per_class"] >= 0, "must be >= 0"),
        ("num_workers", config["num_workers"] >= 0, "must be >= 0"),
        ("grad_clip", config["grad_clip"] is None or config["grad_clip"] > 0, "must be > 0 or null"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"config key {key!r} {what}, got {config[key]!r}")
    parse_duration(config["max_time"])
    try:
        validate_model_config({k: config[k] for k in MODEL_DEFAULTS})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config["cls_loss_weight"] > 0 and config["num_classes"] == 0:
        raise ConfigError("config key 'cls_loss_weight' needs num_classes > 0 (a conditional model)")
    return config


def parse_cli(argv):
    """argv -> (config file or None, {key: raw value}); a flag without a value means true."""
    config_file, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --key value")
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, has_value = argv[i + 1], True
                i += 1
        i += 1
        key = name.replace("-", "_")
        if key == "config":
            if not has_value:
                raise ConfigError("flag --config needs a YAML file")
            config_file = value
            continue
        if key not in DEFAULTS:
            raise ConfigError(f"unknown flag --{name} (no config key {key!r})")
        overrides[key] = yaml.safe_load(value) if has_value else True
    return config_file, overrides


def read_yaml_config(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value")
    for key in data:
        if key not in DEFAULTS:
            raise ConfigError(f"{path}: unknown config key {key!r}")
    return data


def resolve_config(argv):
    """-> (config, resume checkpoint state or None)."""
    config_file, cli = parse_cli(argv)
    from_yaml = read_yaml_config(config_file) if config_file else {}
    config = validate_config({**DEFAULTS, **from_yaml, **cli})
    if config["resume"] is None:
        return config, None
    path = os.path.join(config["out_dir"], "last.pt") if config["resume"] is True else config["resume"]
    state = load_checkpoint(path)
    # A resumed run continues the stored config; keys given again (YAML or flags) override it.
    given = {**from_yaml, **cli}
    stored = {**DEFAULTS, **{k: v for k, v in state["config"].items() if k in DEFAULTS}}
    for key in MODEL_DEFAULTS:
        if key in given and coerce(key, given[key]) != stored[key]:
            raise ConfigError(f"config key {key!r} is {given[key]!r} but the checkpoint {path} "
                              f"was trained with {stored[key]!r}; model keys cannot change on resume")
    config = validate_config({**stored, **given, "resume": path})
    return config, state


# --------------------------------------------------------------------------------------------
# Data

def load_split(root, split, num_classes, image_size, progress):
    csv_path = dataset.split_csv_path(root, split)
    items = dataset.read_split_csv(root, csv_path, num_classes=num_classes or None, allow_unknown=False)
    images = dataset.load_images(dataset.item_paths(root, csv_path, items), image_size,
                                 progress=None if progress else False)
    return items, images


def load_data(config, is_main):
    """-> (train LabelledImages, val LabelledImages or None, a one-line description)."""
    root = config["data_dir"]
    if config["make_demo_data"] and (
            not os.path.isfile(dataset.split_csv_path(root, config["train_split"]))
            or os.path.isfile(os.path.join(root, dataset.DEMO_MARKER))):
        if is_main:
            dataset.make_demo_dataset(root)
        if dist.is_initialized():
            dist.barrier()
    if not os.path.isdir(root):
        raise dataset.DataError(f"data directory not found: {root}")
    K, S = config["num_classes"], config["image_size"]
    train_csv = dataset.split_csv_path(root, config["train_split"])
    items = dataset.read_split_csv(root, train_csv, num_classes=K or None, allow_unknown=False)
    val_split = config["val_split"]
    if val_split and os.path.isfile(dataset.split_csv_path(root, val_split)):
        train_items, images = items, dataset.load_images(
            dataset.item_paths(root, train_csv, items), S, progress=None if is_main else False)
        val_items, val_images = load_split(root, val_split, K, S, is_main)
        source = f"{val_split}.csv"
    else:
        train_items, val_items = dataset.split_train_val(items, config["val_fraction"], config["seed"])
        all_images = dataset.load_images(dataset.item_paths(root, train_csv, items), S,
                                         progress=None if is_main else False)
        index = {item_id: i for i, (item_id, _) in enumerate(items)}
        images = all_images[[index[item_id] for item_id, _ in train_items]]
        val_images = all_images[[index[item_id] for item_id, _ in val_items]]
        source = f"{config['val_fraction']:g} of {config['train_split']}.csv"
    if not train_items:
        raise dataset.DataError(f"{train_csv}: no training images left after the validation split")
    train = dataset.LabelledImages(images, [label for _, label in train_items])
    val = dataset.LabelledImages(val_images, [label for _, label in val_items]) if val_items else None
    description = f"{len(train)} training images, {len(val) if val else 0} validation images ({source})"
    return train, val, description


# --------------------------------------------------------------------------------------------
# RNG state as plain tensors and primitives (loadable with weights_only=True)

def rng_state():
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def ema_multi_avg_fn(decay):
    """An EMA for AveragedModel(multi_avg_fn=...) like torch's get_ema_multi_avg_fn, with a warm-up:
    update n uses min(decay, (1 + n) / (10 + n)), so that short runs are not dominated by the
    first steps' weights."""
    @torch.no_grad()
    def update(ema_params, current_params, num_averaged):
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, current_params, weight)
    return update


# --------------------------------------------------------------------------------------------
# Evaluation and sampling

@torch.no_grad()
def evaluate(model, data, config, device, show_progress):
    """-> (mean bits/dim under the true label, accuracy of argmax_c log p(x|c) or None), in float32
    even when training uses bf16: bf16 moves log p(x|c) by tens of nats and flips predictions."""
    model.eval()
    K, bs = config["num_classes"], config["eval_batch_size"]
    nll_sum, correct, n = 0.0, 0, 0
    batches = range(0, len(data), bs)
    if show_progress:
        batches = tqdm(batches, desc="eval", unit="batch", leave=False)
    for start in batches:
        x = dataset.to_model_input(data.images[start:start + bs]).to(device)
        if config["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.labels[start:start + bs].to(device)
        if K:
            ll = class_log_likelihoods(model, x, K)  # [B, K]
            nll = -ll.gather(1, y[:, None]).squeeze(1)
            correct += int((ll.argmax(dim=1) == y).sum())
        else:
            nll = discretized_mix_logistic_nll(x, model(x, None))
        nll_sum += float(nll.double().sum())
        n += x.shape[0]
    bpd = bits_per_dim(torch.tensor(nll_sum / n, dtype=torch.float64), data.images.shape[1:]).item()
    return bpd, (correct / n if K else None)


def sample_grid(model, config, device, seed):
    """samples_per_class images per class (one row each), [K * n, 3, S, S] in [-1, 1], drawn with
    the cached sampler of fast_sampler (equal to a full forward pass per pixel, much faster)."""
    K, n = config["num_classes"], config["samples_per_class"]
    labels = torch.arange(K, device=device).repeat_interleave(n) if K else None
    generator = torch.Generator(device=device).manual_seed(seed)
    return generate_fast(model, labels, generator, n=None if K else n)


# --------------------------------------------------------------------------------------------
# Training

class Stop(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def random_hflip(x, seed):
    """Mirror each image of [B, C, H, W] left-right with probability 1/2, drawn from `seed`."""
    flip = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) < 0.5  # [B]
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def training_loss(net, x, y, num_classes, cls_loss_weight, cls_batch_size=0):
    """-> (loss, mean bits/dim under the true labels). The loss is that bits/dim, plus
    cls_loss_weight x the cross-entropy of the label posterior of the first cls_batch_size images
    (0: all of them). Those images are scored under every label, the rest under their true label
    only, all in one forward pass: B + S*(K-1) images instead of K*B."""
    if cls_loss_weight == 0:
        nll = discretized_mix_logistic_nll(x, net(x, y if num_classes else None))
        bpd = bits_per_dim(nll.float(), x.shape[1:]).mean()
        return bpd, bpd
    S = min(cls_batch_size or len(x), len(x))
    scored = torch.cat([x[:S].repeat(num_classes, 1, 1, 1), x[S:]])  # [K*S + B-S, C, H, W]
    labels = torch.cat([torch.arange(num_classes, device=x.device).repeat_interleave(S), y[S:]])
    nll_all = discretized_mix_logistic_nll(scored, net(scored, labels))
    ll = -nll_all[:num_classes * S].view(num_classes, S).T  # [S, K], label-major as class_log_likelihoods
    nll = torch.cat([-ll.gather(1, y[:S, None]).squeeze(1), nll_all[num_classes * S:]])  # [B]
    ce = F.nll_loss(log_posterior(ll.float()), y[:S])
    bpd = bits_per_dim(nll.float(), x.shape[1:]).mean()
    return bpd + cls_loss_weight * ce, bpd


class Trainer:
    def __init__(self, config, resume_state):
        self.config = config
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.device = self.pick_device()
        self.distributed = self.world_size > 1
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        self.resume_state = resume_state
        self.signal_received = None
        self.started = time.time()
        self.max_time = parse_duration(config["max_time"])
        self.wandb_run = None

    def pick_device(self):
        wanted = self.config["device"]
        if wanted == "cuda" and not torch.cuda.is_available():
            raise ConfigError("config key 'device' is 'cuda' but CUDA is not available here")
        if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def log(self, message):
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    # -- setup ---------------------------------------------------------------------------------

    def setup(self):
        c = self.config
        cuda = self.device.type == "cuda"
        self.train_data, self.val_data, description = load_data(c, self.is_main)
        seed_everything(c["seed"])
        self.model = build_model({k: c[k] for k in MODEL_DEFAULTS}).to(self.device)
        if c["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.resume_state is None:
            self.data_dependent_init()
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_multi_avg_fn(c["ema_decay"]),
                                 use_buffers=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=c["lr_decay"])
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.epoch_bpd_sum, self.epoch_batches, self.elapsed_before = 0.0, 0, 0.0
        self.best, self.last_metrics = None, None
        self.evaluated_at = None
        self.wandb_id = secrets.token_hex(4)
        seed_everything(c["seed"] + self.rank)  # dropout masks differ between processes
        if self.resume_state is not None:
            self.load_state(self.resume_state)
            self.resume_state = None
        self.net = self.model  # what the training step calls; self.model stays the plain module
        if self.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.local_rank] if cuda else None)
        if c["compile"]:
            self.net = torch.compile(self.net)
        amp = c["amp"] and native_bf16(self.device)
        if c["amp"] and not amp:
            self.log(f"amp: {self.device.type} has no native bf16 (on CPUs: AVX512-BF16 or AMX); "
                     f"training in float32")
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {n_params:,} parameters; data: {description}; device: {self.device}"
                 f"{f' x {self.world_size} processes' if self.distributed else ''}; out_dir: {c['out_dir']}")
        if self.is_main:
            os.makedirs(c["out_dir"], exist_ok=True)
            for name in os.listdir(c["out_dir"]):  # temp files of saves cut short by a kill
                if name.startswith(".tmp-") and name.endswith(".pt"):
                    os.remove(os.path.join(c["out_dir"], name))
            with open(os.path.join(c["out_dir"], "config.yaml"), "w") as f:
                yaml.safe_dump(c, f, sort_keys=False)
            self.setup_wandb()

    def data_dependent_init(self):
        n = len(self.train_data)
        generator = torch.Generator().manual_seed(self.config["seed"])
        index = torch.randperm(n, generator=generator)[:min(n, max(self.config["batch_size"], 16))]
        x = dataset.to_model_input(self.train_data.images[index]).to(self.device)
        labels = self.train_data.labels[index].to(self.device) if self.config["num_classes"] else None
        self.model.eval()
        data_dependent_init(self.model, x, labels)
        self.model.train()

    def setup_wandb(self):
        mode = self.config["wandb"]
        if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self.log("warning: wandb is not installed; not logging to wandb")
            return
        if mode == "online":
            try:
                logged_in = wandb.login(prompt=False)
            except Exception:  # noqa: BLE001 - any failure means: no credentials
                logged_in = False
            if not logged_in:
                self.log("warning: wandb has no credentials (run `wandb login`); logging offline instead")
                mode = "offline"
        try:
            self.wandb_run = wandb.init(project=self.config["wandb_project"], dir=self.config["out_dir"],
                                        id=self.wandb_id, resume="allow", mode=mode, config=self.config)
        except Exception as err:  # noqa: BLE001 - logging must never stop training
            self.log(f"warning: wandb failed to start ({str(err).splitlines()[0] if str(err) else err}); "
                     f"not logging to wandb")

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self):
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "ema_n_averaged": int(self.ema.n_averaged),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": dict(self.config),
            "epoch": self.epoch,                  # completed epochs
            "batch_in_epoch": self.batch_in_epoch,  # batches done in the epoch under way
            "step": self.step,
            "epoch_bpd_sum": self.epoch_bpd_sum,
            "epoch_batches": self.epoch_batches,
            "elapsed": self.elapsed(),
            "rng": self.rng,
            "rng_per_rank": self.rng_per_rank,
            "world_size": self.world_size,
            "wandb_id": self.wandb_id,
            "best": self.best,
            "best_metric": self.config["best_metric"],
            "metrics": self.last_metrics,
        }

    def load_state(self, state):
        needed = ("model", "ema", "optimizer", "scheduler", "epoch", "batch_in_epoch", "step", "rng",
                  "epoch_bpd_sum", "epoch_batches", "elapsed", "wandb_id", "best", "metrics")
        missing = [key for key in needed if key not in state]
        if missing:
            raise CheckpointError(f"{self.config['resume']}: cannot resume from it: not a train.py "
                                  f"checkpoint (no {missing[0]!r}); it can still be used for classify/sample")
        try:
            self.model.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(state.get("ema_n_averaged", 1))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{self.config['resume']}: cannot resume from it "
                                  f"({str(err).strip().splitlines()[0]})") from None
        self.apply_new_schedule(state["config"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.epoch_bpd_sum, self.epoch_batches = state["epoch_bpd_sum"], state["epoch_batches"]
        self.elapsed_before = state["elapsed"]
        self.wandb_id, self.best, self.last_metrics = state["wandb_id"], state["best"], state["metrics"]
        if self.last_metrics is not None:
            self.evaluated_at = (self.last_metrics["epoch"], self.last_metrics["step"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.world_size:
            set_rng_state(per_rank[self.rank])
        elif self.world_size == 1:
            set_rng_state(state["rng"])
        self.log(f"resumed from {self.config['resume']}: epoch {self.epoch}, batch {self.batch_in_epoch}, "
                 f"step {self.step}")

    def apply_new_schedule(self, stored):
        """A resumed run given another lr restarts the decay from it; another lr_decay decays at
        that rate from here on. Without this the optimizer and scheduler states would silently
        keep the old ones."""
        c = self.config
        if c["lr"] != stored.get("lr"):
            for group in self.optimizer.param_groups:
                group["lr"] = c["lr"]
            self.scheduler.base_lrs = [c["lr"]] * len(self.optimizer.param_groups)
            self.log(f"lr restarts at {c['lr']} (was {stored.get('lr')} when the run began)")
        self.scheduler.gamma = c["lr_decay"]

    def capture_rng(self):
        self.rng = rng_state()
        self.rng_per_rank = None
        if self.distributed:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, self.rng)
            self.rng_per_rank = gathered

    def save(self, name):
        """Write <out_dir>/<name> on rank 0 (the RNG state is gathered from every rank first)."""
        self.capture_rng()
        if self.is_main:
            save_checkpoint(os.path.join(self.config["out_dir"], name), self.state())

    # -- the loop ------------------------------------------------------------------------------

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started

    def batches(self, epoch):
        sampler = torch.utils.data.distributed.DistributedSampler(
            self.train_data, num_replicas=self.world_size, rank=self.rank, shuffle=True,
            seed=self.config["seed"], drop_last=False)
        sampler.set_epoch(epoch)
        order = list(sampler)
        bs = self.config["batch_size"]
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def train_step(self, x, y):
        """One optimisation step; -> the batch's mean bits/dim (all-reduced); may raise Stop."""
        c = self.config
        K = c["num_classes"]
        if c["hflip"]:
            # Its own generator, seeded by (seed, step, rank): the dropout stream stays as without
            # flips, and a resumed run flips the same images.
            seed = np.random.SeedSequence([c["seed"], self.step, self.rank]).generate_state(1)[0]
            x = random_hflip(x, int(seed))
        if c["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            loss, bpd = training_loss(self.net, x, y, K, c["cls_loss_weight"], c["cls_batch_size"])
        # One all-reduce per step carries the loss and the stop flags, so every process stops together.
        local = torch.tensor([float(self.signal_received is not None), float(self.time_is_up())],
                             dtype=torch.float64, device=x.device)
        flags = torch.cat([bpd.detach().double().view(1), (~torch.isfinite(loss.detach())).double().view(1),
                           local])
        if self.distributed:
            dist.all_reduce(flags)
        bpd_sum, nonfinite, signalled, time_up = flags.tolist()
        if nonfinite:
            self.log(f"error: the loss became {loss.item()} at epoch {self.epoch + 1}, step {self.step + 1}; "
                     f"stopping without saving ({os.path.join(c['out_dir'], 'last.pt')} and best.pt are "
                     f"left as they were). Try a lower lr or a grad_clip.")
            raise Stop(EXIT_NONFINITE)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        stop = "signal" if signalled else "time" if time_up else None
        return bpd_sum / self.world_size, stop

    def run(self):
        self.setup()
        c = self.config
        if self.epoch >= c["epochs"] and self.batch_in_epoch == 0:
            self.log(f"nothing to do: the run has already trained {self.epoch} of {c['epochs']} epochs "
                     f"(pass --epochs N to train longer)")
            return 0
        previous_handlers = self.install_signal_handlers()
        try:
            while self.epoch < c["epochs"]:
                stopped = self.run_epoch()
                if stopped == "signal":
                    self.save("last.pt")
                    signum = self.signal_received
                    self.log(f"stopped by signal {signum}: saved {os.path.join(c['out_dir'], 'last.pt')}; "
                             f"continue with --resume")
                    raise Stop(128 + signum)
                if stopped == "time":
                    self.log(f"max_time {c['max_time']} reached at epoch {self.epoch}, "
                             f"batch {self.batch_in_epoch}: evaluating and saving")
                    self.end_of_training(sample=False)
                    return 0
                self.end_of_epoch()
            if self.evaluated_at != (self.epoch, self.step):
                self.end_of_training(sample=True)
            elif c["samples_per_class"] and (not c["sample_every"] or self.epoch % c["sample_every"]):
                self.write_samples()
            return 0
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if self.wandb_run is not None:
                self.wandb_run.finish()

    def time_is_up(self):
        return self.max_time is not None and time.time() - self.started >= self.max_time

    def run_epoch(self):
        """-> None when the epoch completed, or 'signal' / 'time' when it stopped early."""
        c = self.config
        batches = self.batches(self.epoch)[self.batch_in_epoch:]
        loader = torch.utils.data.DataLoader(
            self.train_data, batch_sampler=batches, num_workers=c["num_workers"],
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(c["seed"] + self.epoch))  # not the global RNG
        progress = None
        if self.is_main:
            progress = tqdm(total=len(batches) + self.batch_in_epoch, initial=self.batch_in_epoch,
                            desc=f"epoch {self.epoch + 1}/{c['epochs']}", unit="batch", leave=False)
        self.model.train()
        try:
            for x, y in loader:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                bpd, stop = self.train_step(x, y)
                self.batch_in_epoch += 1
                self.epoch_bpd_sum += bpd
                self.epoch_batches += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(bpd=f"{bpd:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if stop:
                    return stop
        finally:
            if progress is not None:
                progress.close()
        self.epoch += 1
        self.batch_in_epoch = 0
        return None

    def end_of_epoch(self):
        c = self.config
        last = self.epoch == c["epochs"]
        if self.epoch % c["eval_every"] == 0 or last:
            self.evaluate_and_log()
        if c["samples_per_class"] and c["sample_every"] and self.epoch % c["sample_every"] == 0:
            self.write_samples()
        if self.epoch % c["save_every"] == 0 or last:
            self.save("last.pt")
        if not last:
            self.epoch_bpd_sum, self.epoch_batches = 0.0, 0

    def end_of_training(self, sample):
        self.evaluate_and_log()
        if sample and self.config["samples_per_class"]:
            self.write_samples()
        self.save("last.pt")

    def evaluate_and_log(self):
        """Evaluate the EMA weights on the validation set (rank 0), log, and update best.pt."""
        c = self.config
        self.evaluated_at = (self.epoch, self.step)  # on every rank
        if self.is_main:
            train_bpd = self.epoch_bpd_sum / self.epoch_batches if self.epoch_batches else None
            val_bpd = val_acc = None
            if self.val_data is not None:
                val_bpd, val_acc = evaluate(self.ema.module, self.val_data, c, self.device,
                                            show_progress=True)
            metrics = {"epoch": self.epoch, "step": self.step, "train_bpd": train_bpd,
                       "val_bpd": val_bpd, "val_acc": val_acc,
                       "lr": self.scheduler.get_last_lr()[0], "seconds": round(self.elapsed(), 2)}
            self.last_metrics = metrics
            with open(os.path.join(c["out_dir"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
            self.log(f"epoch {self.epoch} step {self.step}: train {fmt(train_bpd, '.4f')} bpd, "
                     f"val {fmt(val_bpd, '.4f')} bpd, val acc {fmt(val_acc, '.4f')}")
            if self.wandb_run is not None:
                self.wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=self.step)
            metric = "val_acc" if c["best_metric"] == "val_acc" and val_acc is not None else "val_bpd"
            value = metrics[metric]
            if value is not None:
                better = (self.best is None or (value > self.best if metric == "val_acc" else value < self.best))
                if better:
                    self.best = value
            else:
                better = False
        else:
            better = False
        flag = torch.tensor([float(better)], device=self.device)
        if self.distributed:
            dist.broadcast(flag, 0)
        if flag.item():
            self.save("best.pt")

    def write_samples(self):
        if self.is_main:
            import torchvision
            x = sample_grid(self.ema.module, self.config, self.device, self.config["seed"])
            path = os.path.join(self.config["out_dir"], f"samples_epoch{self.epoch:04d}.png")
            torchvision.utils.save_image((x + 1) / 2, path, nrow=self.config["samples_per_class"] or 8)
            self.log(f"samples: {path}")
            if self.wandb_run is not None:
                import wandb
                self.wandb_run.log({"samples": wandb.Image(path)}, step=self.step)
        if self.distributed:
            dist.barrier()

    # -- signals -------------------------------------------------------------------------------

    def install_signal_handlers(self):
        def handler(signum, frame):
            if self.signal_received is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.signal_received = signum
            self.log(f"signal {signum} received: saving last.pt after this step")
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        print("\nkeys (defaults):")
        for key, value in DEFAULTS.items():
            print(f"  --{key.replace('_', '-')} {value!r}")
        return 0
    code = 0
    try:
        config, state = resolve_config(argv)
        last = os.path.join(config["out_dir"], "last.pt")
        if state is None and os.path.isfile(last) and not config["overwrite"]:
            raise ConfigError(f"{last} exists: pass --resume to continue that run, --overwrite to start "
                              f"afresh, or another --out-dir")
        trainer = Trainer(config, state)
        code = trainer.run()
    except (ConfigError, dataset.DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except Stop as stop:
        code = stop.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    reuse_freed_memory()  # faster on CPUs: see utils
    sys.exit(main())
