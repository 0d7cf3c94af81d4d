"""Files that must survive a crash, and what goes in them: atomic writes (checkpoints and CSVs),
loading with weights_only=True, rebuilding a model, a training run's state, and the RNG state.

A checkpoint is a plain dict of tensors and primitives, so torch.load(..., weights_only=True)
reads it and a checkpoint from elsewhere cannot run code.

As a command, it writes a train.py checkpoint without what only resuming needs, to ship it:
    python checkpoint.py runs/big/last.pt checkpoints/big.pt
    python checkpoint.py runs/final/last.pt checkpoints/big.pt --calibration-from runs/big/last.pt
"""
import os
import random
import re
import tempfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from config import ArgumentParser, UsageError, check_distinct, check_output, first_line, report, run_cli
from model import MODEL_DEFAULTS, build_model


TEMP_PREFIX = ".tmp-"  # of the files atomic_write writes before it moves them into place


class CheckpointError(UsageError):
    """A checkpoint file that is missing, unreadable, or not one of ours."""


def atomic_write(path, write):
    """Call write(binary file) on a temp file beside `path`, then os.replace it into place.

    A crash or kill at any moment leaves either the old file or the new one, never a torn one. A
    link is written through, to the file it names.
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; ours need not be
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_cut_short_writes(directory):
    """Create `directory`, or delete the temp files that killed atomic_writes left in it."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            os.remove(os.path.join(directory, name))


def save_checkpoint(path, state):
    """Write `state` (a dict of tensors and primitives) atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True (it cannot run code) and check that it is ours."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; name a checkpoint file in it (last.pt, best.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for foreign or corrupt files
        raise CheckpointError(f"{path} is not a loadable checkpoint of plain tensors and "
                              f"primitives ({load_failure(err)})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' and 'config' entries)")
    return state


def load_failure(err):
    """torch.load's reason in a few words: a weights_only refusal comes as a paragraph of advice."""
    text = str(err)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it holds a Python object, {refused.group(1)}, which could run code when loaded"
    if "Weights only load failed" in text:
        return "not a file torch.load reads with weights_only=True"
    return first_line(err)


def model_from_checkpoint(state, weights="ema"):
    """Rebuild the model stored in a checkpoint dict; `weights` is 'ema' (if present) or 'model'."""
    model = build_model({k: v for k, v in state["config"].items() if k in MODEL_DEFAULTS})
    key = "ema" if weights == "ema" and state.get("ema") is not None else "model"
    model.load_state_dict(state[key])
    return model.eval()


def load_model(checkpoint, device):
    """-> (the EMA model of a train.py checkpoint, on `device`, in eval mode; the checkpoint dict);
    CheckpointError otherwise."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    try:
        model = model_from_checkpoint(state, weights="ema")
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{checkpoint}: the weights do not fit the model its config "
                              f"describes ({first_line(err)})") from None
    return model.to(device).eval(), state


# --------------------------------------------------------------------------------------------
# A training run's state

@dataclass
class Progress:
    """How far a training run has got; saved with its weights and restored on resume."""
    epoch: int = 0                # completed epochs
    batch_in_epoch: int = 0       # batches done in the epoch under way
    step: int = 0
    epoch_bpd_sum: float = 0.0    # the epoch's training bits/dim so far, summed over batches
    epoch_batches: int = 0
    elapsed: float = 0.0          # seconds of training, over all sessions, at the last save
    wandb_id: str = ""
    best: float = None            # the best value of config["best_metric"] so far
    metrics: dict = None          # the last evaluation's
    temperature: float = None     # of the posterior, fitted on the validation split at the last evaluation
    fitted_prior: dict = None     # {"temperature", "log_prior"}: fit_prior there (classify.py --prior fitted)


def training_state(model, ema, optimizer, scheduler, config, progress, rng, rng_per_rank, world_size,
                   held_out_digest=None):
    """-> the checkpoint dict of a training run. `ema` is an AveragedModel; `rng_per_rank` is
    every process's rng_state() under DDP, else None; held_out_digest: {"val", "report"} ->
    dataset.items_digest of the images the run held out."""
    return {
        "model": model.state_dict(),
        "ema": ema.module.state_dict(),
        "ema_n_averaged": int(ema.n_averaged),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": dict(config),
        **asdict(progress),
        "rng": rng,
        "rng_per_rank": rng_per_rank,
        "world_size": world_size,
        "held_out_digest": held_out_digest,
    }


def check_resumable(state, source):
    """CheckpointError naming `source` unless `state` is a whole training_state() dict (a copy
    written to ship has no optimizer state)."""
    keys = [f.name for f in fields(Progress)]
    required = [key for key in keys if key not in ("temperature", "fitted_prior")]  # older checkpoints have none
    missing = [key for key in ("model", "ema", "optimizer", "scheduler", "rng", *required) if key not in state]
    if missing:
        raise CheckpointError(f"{source}: cannot resume from it: not a train.py checkpoint "
                              f"(no {missing[0]!r}); it can still be used for classify/sample")


def restore_training_state(state, model, ema, optimizer, scheduler, source):
    """Load a training_state() dict into the objects; -> its Progress. CheckpointError names
    `source` when the dict is not a train.py checkpoint or does not fit the objects."""
    check_resumable(state, source)
    keys = [f.name for f in fields(Progress)]
    try:
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(state.get("ema_n_averaged", 1))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot resume from it ({first_line(err)})") from None
    return Progress(**{key: state[key] for key in keys if key in state})


RESUME_ONLY_KEYS = ("optimizer", "scheduler", "rng", "rng_per_rank")


def for_inference(state):
    """-> a training_state() dict without the optimizer, scheduler and RNG state: the weights (raw
    and EMA), the config and the fitted temperature stay, so classify.py and sample.py read it as
    they read the whole one, but --resume refuses it. Adam's two moments make the optimizer state
    twice the size of the weights."""
    return {key: value for key, value in state.items() if key not in RESUME_ONLY_KEYS}


def averaged_only(state):
    """-> `state` with the EMA weights as its only weights (under "model", "ema" dropped): what
    classify.py and sample.py use, in half the size. Where there is no EMA, the raw weights stay."""
    if state.get("ema") is None:
        return state
    return {**{key: value for key, value in state.items() if key not in ("ema", "ema_n_averaged")},
            "model": state["ema"]}


def with_calibration_from(state, other, other_path):
    """-> `state` with the temperature and fitted prior of `other`, a checkpoint of the same model."""
    if other.get("temperature") is None:
        raise CheckpointError(f"{other_path}: it has no fitted temperature to take")
    # A temperature scales one network's log-likelihood margins: take it only from the same network
    # (a twin run of the same recipe, say), not from another one.
    for key, default in MODEL_DEFAULTS.items():  # a key that a checkpoint predates has its default
        mine, theirs = state["config"].get(key, default), other["config"].get(key, default)
        if mine != theirs:
            raise CheckpointError(f"{other_path}: another network ({key} {theirs}, where the model has "
                                  f"{mine}); its temperature does not fit this model")
    return {**state, "temperature": other["temperature"], "fitted_prior": other.get("fitted_prior")}


def restore_rng(state, rank, world_size):
    """Restore this process's RNG from a training_state() dict where the run had as many
    processes, or rank 0's on a single process; on any other number, the fresh seeds stay."""
    per_rank = state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        set_rng_state(per_rank[rank])
    elif world_size == 1:
        set_rng_state(state["rng"])


# --------------------------------------------------------------------------------------------
# RNG state as plain tensors and primitives (loadable with weights_only=True)

def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# --------------------------------------------------------------------------------------------
# The command

def main(argv=None):
    parser = ArgumentParser(prog="checkpoint.py", description="Write a train.py checkpoint "
                            "without its optimizer, scheduler and RNG state, to ship it: "
                            "classify.py and sample.py read the copy, --resume does not.")
    parser.add_argument("source", help="a train.py checkpoint (runs/NAME/last.pt or best.pt)")
    parser.add_argument("dest", help="the file to write (atomically)")
    parser.add_argument("--calibration-from", default=None, metavar="CHECKPOINT",
                        help="take the temperature and the fitted prior from this checkpoint instead: "
                             "for a final model that trained on its validation images, the ones "
                             "fitted on them while they were still held out")
    parser.add_argument("--averaged-only", action="store_true",
                        help="keep only the averaged (EMA) weights, the ones classify.py and sample.py "
                             "use: half the size again (for two or more experts under a size limit)")
    args = parser.parse_args(argv)
    try:
        check_output("dest", args.dest)
        check_distinct([("dest", args.dest)], [("source", args.source), ("--calibration-from", args.calibration_from)])
        state = load_checkpoint(args.source)
        if args.calibration_from is not None:
            state = with_calibration_from(state, load_checkpoint(args.calibration_from), args.calibration_from)
        state = for_inference(state)
        save_checkpoint(args.dest, averaged_only(state) if args.averaged_only else state)
    except UsageError as err:  # also CheckpointError
        return report("checkpoint.py", err)
    print(f"checkpoint.py: wrote {args.dest} ({os.path.getsize(args.dest) / 2 ** 20:.1f} MiB; "
          f"{args.source}: {os.path.getsize(args.source) / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
