"""How a run is set up: the training config, the command line of the three CLIs, and the machine.

The training config is one table (KEYS) of keys, types, defaults and help. Values come from the
defaults (the demo setup; configs/demo.yaml holds the same), then a YAML file, then the command
line, where every key is a flag (--data-dir or --data_dir) whose value is read as YAML (3, 1e-3,
true, null) and a bare flag means true. A resumed run continues its checkpoint's config, and
keys given again override it, except the model's, which cannot change.

UsageError is the one error type for a user's mistake (a flag, a key, a data file, a checkpoint:
dataset.DataError and checkpoint.CheckpointError derive from it): the CLIs print its one line and
exit 2. ArgumentParser is the one parser class of the CLIs.
"""
import argparse
import ctypes
import ctypes.util
import math
import os
import re
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
import yaml

from model import MODEL_DEFAULTS, MODEL_KEYS, Key, validate_model_config

EXIT_USER_ERROR = 2


class UsageError(Exception):
    """A user's mistake; the message is one line that names the flag, key or file at fault."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line gives one stderr line (and exit code 2), no usage dump,
    and a flag is never guessed from a prefix (--n-per-clas is an error, not --n-per-class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def first_line(err):
    """An exception's message cut to its first line (its type's name where it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_output(option, path, folder=False):
    """UsageError now, before any work, unless `path` can be written as a file (folder=True: as a
    folder): it is not the other kind, and its nearest existing parent is a folder we may write in."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} exists and is not a folder")
    if not folder and os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if not folder and os.path.isfile(path) and not os.stat(path).st_mode & 0o222:
        raise UsageError(f"{option} {path} is read-only; make it writable or give another path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: no permission to write in {parent}")


def same_file(a, b):
    """Whether two paths name one file: the same file where both exist (links too), else one path."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(outputs, inputs=()):
    """UsageError now unless every output, an (option, path) pair, names a file of its own: not an
    input's and not another output's (a run would write over what it reads or has just written).
    Pairs whose path is None are skipped."""
    outputs = [(option, path) for option, path in outputs if path is not None]
    inputs = [(option, path) for option, path in inputs if path is not None]
    for k, (option, path) in enumerate(outputs):
        for other, other_path in inputs + outputs[:k]:
            if same_file(path, other_path):
                raise UsageError(f"{option} {path} is the same file as {other} {other_path}; "
                                 f"give {option} a path of its own")


def report(prog, err):
    """Print a UsageError as exactly one line on stderr; -> the exit code for it."""
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_cli(main):
    """Exit with main()'s code. A reader that stops early (`classify.py ... | head -1`) does not
    stop the work: the lines it did not read are dropped, and the files are still written."""
    sys.stdout, sys.stderr = (ReaderMayLeave(stream) if stream is not None else None  # None: closed (>&-)
                              for stream in (sys.stdout, sys.stderr))
    sys.exit(main())


class ReaderMayLeave:
    """A text stream whose output goes nowhere once its pipe's reader has gone, instead of
    raising BrokenPipeError at the next print (or at exit)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        self.guarded(self.stream.write, text)
        return len(text)

    def writelines(self, lines):
        self.guarded(self.stream.writelines, lines)

    def flush(self):
        self.guarded(self.stream.flush)

    def guarded(self, method, *args):
        try:
            method(*args)
        except BrokenPipeError:  # from now on the descriptor writes to /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


# --------------------------------------------------------------------------------------------
# The training config: one table of keys (model.Key: type, default, help, allowed values)

# The demo's model; the model's own defaults (model.MODEL_KEYS) are the original paper's.
DEMO_MODEL = {"nr_resnet": 1, "nr_filters": 16, "nr_logistic_mix": 5, "dropout": 0.1, "num_classes": 4,
              "embedding_dim": 16, "block_conditioning": "film", "image_size": 32}

KEYS = [replace(key, default=DEMO_MODEL[key.name]) for key in MODEL_KEYS] + [
    # data
    Key("data_dir", str, "data/demo", "the data set; the demo set is generated at data/demo only"),
    Key("train_split", str, "train", "<data_dir>/<train_split>.csv"),
    Key("val_split", str, "val", "<data_dir>/<val_split>.csv if it exists, else carve val_fraction",
        nullable=True),
    Key("val_fraction", float, 0.1, "share of the training CSV held out when there is no val CSV", "[0, 1)"),
    Key("report_fraction", float, 0.0, "share of the rest held out of training and of every choice, "
        "to report on (<out_dir>/splits/report.csv)", "[0, 1)"),
    Key("report_seed", int, 1, "seeds the report split (the validation split uses split_seed)"),
    Key("split_seed", int, None, "seeds the validation split; null: seed (so runs of other seeds can "
        "hold out the same images, for classify.py with several checkpoints)", nullable=True),
    Key("train_on_held_out", str, "none", "a final model, once the recipe is fixed: the validation "
        "images also train, or those and the report split's (their figures are then training figures)",
        choices=("none", "val", "val+report")),
    Key("num_workers", int, 0, "DataLoader workers", "[0, inf)"),
    Key("hflip", bool, False, "mirror each training image left-right with probability 1/2"),
    Key("shift", int, 0, "translate each training image by up to this many pixels along each axis "
        "(reflected edges; 0: off)", "[0, inf)"),
    # optimisation
    Key("epochs", int, 8, "epochs in all (a resumed run trains up to this many)", "[1, inf)"),
    Key("batch_size", int, 32, "images per step, per process", "[1, inf)"),
    Key("eval_batch_size", int, 64, "images per forward pass in evaluation", "[1, inf)"),
    Key("lr", float, 0.002, "Adam's learning rate", "(0, inf)"),
    Key("lr_decay", float, 0.999, "multiplicative, every step", "(0, 1]"),
    Key("lr_restart", bool, False, "on resume, start the decay again at lr even where lr is the "
        "run's own (a new lr always restarts it); this chunk only"),
    Key("grad_clip", float, None, "max gradient norm, or null", "(0, inf)", nullable=True),
    Key("ema_decay", float, 0.99, "decay of the weight average that is evaluated and saved", "[0, 1)"),
    Key("cls_loss_weight", float, 0.0, "weight of the label posterior's cross-entropy (nats/image)",
        "[0, inf)"),
    Key("cls_batch_size", int, 0, "images per batch scored under every label for it (0: all)", "[0, inf)"),
    Key("seed", int, 0, "seeds the weights, the data order, dropout and the samples"),
    Key("device", str, "auto", "auto picks CUDA where there is one", choices=("auto", "cpu", "cuda")),
    Key("amp", bool, False, "bf16 autocast where the device has native bf16 (CUDA; AVX512-BF16 or AMX)"),
    Key("compile", bool, False, "torch.compile of the network and its loss (minutes of warm-up; each "
        "epoch drops a smaller last batch; no faster on CPUs: BENCHMARKS.md)"),
    Key("compile_mode", str, "default", "torch.compile's mode; reduce-overhead replays the step's kernels "
        "as CUDA graphs, for a GPU step bound by launching them (not yet tried under torchrun)",
        choices=("default", "reduce-overhead")),
    Key("channels_last", bool, False, "channels-last memory format (faster or slower by size)"),
    # when to evaluate, save and sample (in epochs), and where
    Key("out_dir", str, "checkpoints/demo", "last.pt, best.pt, metrics.jsonl, config.yaml, samples"),
    Key("eval_every", int, 1, "evaluate on the validation split every N epochs", "[1, inf)"),
    Key("save_every", int, 1, "write last.pt every N epochs", "[1, inf)"),
    Key("sample_every", int, 0, "a sample grid every N epochs; 0: at the end only", "[0, inf)"),
    Key("samples_per_class", int, 4, "images per class in a grid; 0: no grids", "[0, inf)"),
    Key("best_metric", str, "val_acc", "what best.pt is best at", choices=("val_acc", "val_bpd")),
    Key("max_time", str, None, "wall-clock limit: '45m', '2h', '90s', seconds, or null", nullable=True),
    Key("resume", str, None, "true (<out_dir>/last.pt) or a checkpoint path", nullable=True),
    Key("overwrite", bool, False, "start afresh where an earlier run left its files in <out_dir> (deletes "
        "its metrics.jsonl, best.pt, splits, grids; replaces last.pt)"),
    Key("progress", bool, True, "progress bars (false: the log lines alone, for a log file); this chunk only"),
    Key("wandb", str, "offline", "WANDB_MODE=disabled also disables",
        choices=("offline", "online", "disabled")),
    Key("wandb_project", str, "pixelcnn-pp", "the wandb project"),
]
KEY_BY_NAME = {key.name: key for key in KEYS}
DEFAULTS = {key.name: key.default for key in KEYS}


def validation_seed(config):
    """The seed of a run's validation split: split_seed, or seed where it is null (or predates it)."""
    split_seed = config.get("split_seed")
    return config["seed"] if split_seed is None else split_seed


def coerce(name, value):
    """Check (and gently convert) one config value to its key's type; UsageError names the key."""
    if name not in KEY_BY_NAME:
        raise UsageError(f"unknown config key {name!r}")
    if name == "resume" and isinstance(value, bool):
        return True if value else None
    if name == "max_time" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:
        return KEY_BY_NAME[name].check(value)
    except ValueError as err:
        raise UsageError(str(err)) from None


def validate_config(config):
    """-> the config with every value checked and converted; UsageError names the first bad key."""
    config = {name: coerce(name, value) for name, value in config.items()}
    parse_duration(config["max_time"])
    try:
        validate_model_config({k: config[k] for k in MODEL_DEFAULTS})
    except ValueError as err:
        raise UsageError(str(err)) from None
    if config["lr_restart"] and config["resume"] is None:
        raise UsageError("config key 'lr_restart' restarts a resumed run's decay; it needs resume")
    if config["shift"] >= config["image_size"]:
        raise UsageError(f"config key 'shift' must be below image_size ({config['image_size']}), "
                         f"got {config['shift']}")
    if config["cls_loss_weight"] > 0 and config["num_classes"] == 0:
        raise UsageError("config key 'cls_loss_weight' needs num_classes > 0 (a conditional model)")
    return config


def parse_duration(value):
    """'45m', '2h', '90s', '1h30m', '1.5h', a number of seconds, or None -> seconds (or None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        pattern = r"(\d+(?:\.\d+)?)\s*([hms]?)"
        parts = re.findall(pattern, text)
        if not parts or re.sub(pattern, "", text).strip():
            raise UsageError(f"max_time {value!r} is not a duration like '45m', '2h', '90s' or '1h30m'")
        if len(parts) > 1 and any(unit == "" for _, unit in parts):  # '1h30': 30 s or 30 min?
            raise UsageError(f"max_time {value!r}: give each number its unit, as in '1h30m'")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit] for n, unit in parts)
    if not 0 < seconds < math.inf:
        raise UsageError(f"max_time must be a positive, finite duration, got {value!r}")
    return seconds


def training_parser(prog, description):
    """The train.py command line: --config FILE and one flag per key (dashes or underscores)."""
    p = ArgumentParser(prog=prog, usage=f"{prog} [--config FILE] [--key [VALUE] ...]",
                       description=description, argument_default=argparse.SUPPRESS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="a YAML file of key: value (configs/)")
    for key in KEYS:
        flags = {f"--{key.name.replace('_', '-')}", f"--{key.name}"}
        p.add_argument(*sorted(flags), dest=key.name, nargs="?", const="true", metavar="VALUE",
                       help=f"{key.help}{choices_text(key)} (default: {yaml.safe_dump(key.default).splitlines()[0]})")
    return p


def choices_text(key):
    return f"; one of {', '.join(key.choices)}" if key.choices else ""


def read_yaml_config(path):
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config file must be a mapping of key: value")
    for key in data:
        if key not in DEFAULTS:
            raise UsageError(f"{path}: unknown config key {key!r}")
    return data


def parse_training_args(parser, argv):
    """argv -> (the config given in a YAML file, the config given as flags), values unchecked."""
    given = vars(parser.parse_args(argv))
    config_file = given.pop("config", None)
    from_yaml = read_yaml_config(config_file) if config_file else {}
    return from_yaml, {name: flag_value(name, text) for name, text in given.items()}


def flag_value(name, text):
    """A flag's text as a value: YAML for numbers, booleans and null, but the text as typed for
    keys that hold text (paths, names), so that '2024', 'on' or 'runs/x #1' stay what they are."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if KEY_BY_NAME[name].type is not str or value is None or (name == "resume" and isinstance(value, bool)):
        return value
    return text


def merge_on_resume(stored, given, source):
    """A resumed run continues the `stored` config; keys `given` again override it, except the
    model's, which cannot change. -> the merged, unchecked config."""
    stored = {**DEFAULTS, **{k: v for k, v in stored.items() if k in DEFAULTS}}
    for name in MODEL_DEFAULTS:
        if name in given and coerce(name, given[name]) != stored[name]:
            raise UsageError(f"config key {name!r} is {given[name]!r} but the checkpoint {source} "
                             f"was trained with {stored[name]!r}; model keys cannot change on resume")
    return {**stored, "lr_restart": False, "progress": True, **given, "resume": source}


def resume_path(config):
    return os.path.join(config["out_dir"], "last.pt") if config["resume"] is True else config["resume"]


# --------------------------------------------------------------------------------------------
# The machine

def resolve_device(name, local_rank=0):
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N' -> torch.device; UsageError otherwise.
    Under torchrun, 'auto' and 'cuda' mean this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: CUDA is not available on this machine (use cpu)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def join_processes(device_name):
    """Under torchrun (WORLD_SIZE > 1), join the process group: nccl on GPUs, gloo on CPUs.
    -> (rank, world size, this process's device); (0, 1, device) for a plain run."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def first_error(error):
    """The first process's error message, or None, on every process: if one cannot go on, none
    does, and rank 0 can say why before anything is written. In a plain run, `error` itself."""
    if not dist.is_initialized():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def gather_on_main(local):
    """Every process's `local`, in rank order, on rank 0 (None on the others); [local] in a
    plain run."""
    if not dist.is_initialized():
        return [local]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    return parts


def leave_processes(succeeded):
    """Leave the process group, if any. After a success every process first waits for the others:
    gloo aborts a process that tears down while another still talks to it."""
    if dist.is_initialized():
        if succeeded:
            dist.barrier()
        dist.destroy_process_group()


def native_bf16(device):
    """Whether `device` computes in bf16 natively: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX. (oneDNN emulates bf16 on other AVX-512 CPUs, more slowly than float32.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def speed_up_cpu():
    """The CLIs' process-wide CPU settings, applied at start, before any tensor work:
    reuse_freed_memory and flush_denormals."""
    reuse_freed_memory()
    flush_denormals()


def flush_denormals():
    """Treat float values below the smallest normal number (1.2e-38 in float32) as zero (FTZ/DAZ).

    Training with the hybrid objective produces such numbers (by likelihood alone it was not
    slower): most likely its posterior over labels, which gives a label that trails by more than
    about 87 nats a probability below 1.2e-38, whose gradient flows back through the network.
    An Intel CPU takes a slow microcode path for every such number: on an Intel Xeon, a training
    step of configs/cpen455.yaml on real images ran 2x faster with this, and 45-minute runs took
    3.9-4.1x less time per epoch, with the same metrics to the last digit (BENCHMARKS.md). Only
    values under 1.2e-38 change. Threads started later inherit the setting, so call it before
    any parallel work. -> whether the CPU supports it.
    """
    return torch.set_flush_denormal(True)


def reuse_freed_memory():
    """Let glibc's malloc keep freed memory for the next batch instead of returning it to the OS.

    By default glibc maps every block over 32 MB afresh and unmaps it when freed (and trims the
    top of its heap), so each batch page-faults its activations back in: about a quarter of
    classify.py's time on a CPU (BENCHMARKS.md). The process's memory stays at its peak instead.
    -> whether it applied (only on glibc; elsewhere it changes nothing). PyTorch's CPU tuning
    guide gets the same effect by preloading jemalloc or tcmalloc.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False
