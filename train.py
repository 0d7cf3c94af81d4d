"""Train a conditional PixelCNN++: python train.py [--config configs/X.yaml] [--key value ...]

Every config key is a flag (--data-dir or --data_dir). Values: the defaults (the demo setup),
then the YAML file, then the command line (parsed as YAML: 3, 1e-3, true, null). A flag with no
value means true (--amp, --resume). Under torchrun it trains with DDP. The procedural demo data
set is generated only at the default data_dir, data/demo.

Writes <out_dir>/config.yaml, last.pt, best.pt, metrics.jsonl (one line per evaluation) and
samples_epochNNNN.png (one row per class). Exit codes: 0 done (also at max_time), 2 a user
error (bad flag, config or data; one line on stderr), 3 a non-finite loss, 128+N on signal N
(after saving last.pt).
"""
import contextlib
import json
import os
import secrets
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import dataset
from checkpoint import (Progress, atomic_write, check_resumable, load_checkpoint, remove_cut_short_writes,
                        restore_rng, restore_training_state, rng_state, save_checkpoint, seed_everything,
                        training_state)
from config import (DEFAULTS, UsageError, check_output, first_line, join_processes, leave_processes,
                    merge_on_resume, native_bf16, parse_duration, parse_training_args, report, resume_path,
                    run_cli, same_file, speed_up_cpu, training_parser, validate_config, validation_seed)
from layers import data_dependent_init
from model import MODEL_DEFAULTS, build_model
from sampling import generate
from utils import (bits_per_dim, calibration_metrics, class_log_likelihoods, discretized_mix_logistic_nll,
                   fit_prior, fit_temperature, in_eval_mode, log_posterior, training_loss)

PROG = "train.py"
EXIT_NONFINITE = 3


def resolve_config(argv):
    """-> (config, the checkpoint to resume or None)."""
    from_yaml, from_flags = parse_training_args(training_parser(PROG, __doc__), argv)
    given = {**from_yaml, **from_flags}
    config = validate_config({**DEFAULTS, **given})
    if config["resume"] is None:
        return config, None
    source = resume_path(config)
    state = load_checkpoint(source)
    check_resumable(state, source)  # before the data is read
    return validate_config(merge_on_resume(state["config"], given, source)), state


# --------------------------------------------------------------------------------------------
# Data

def load_data(config, is_main):
    """-> (train LabelledImages, val LabelledImages or None, {"val": items, "report": items}, a
    one-line description). The demo set is generated only at its own default path: a mistyped --data-dir
    is an error."""
    root = config["data_dir"]
    if os.path.normpath(root) == os.path.normpath(DEFAULTS["data_dir"]) and (
            not os.path.isfile(dataset.split_csv_path(root, config["train_split"]))
            or os.path.isfile(os.path.join(root, dataset.DEMO_MARKER))):
        if is_main:
            dataset.make_demo_dataset(root)
        if dist.is_initialized():
            dist.barrier()
    if not os.path.isdir(root):
        raise dataset.DataError(f"data directory not found: {root}")
    train, val, held_out, source = dataset.load_train_val(
        root, config["train_split"], config["val_split"], config["val_fraction"], validation_seed(config),
        config["image_size"], config["num_classes"] or None, progress=None if is_main and config["progress"] else False,
        report_fraction=config["report_fraction"], report_seed=config["report_seed"],
        train_on_held_out=config["train_on_held_out"])
    description = (f"{len(train)} training images, {len(val) if val else 0} validation images ({source}), "
                   f"{len(held_out['report'])} held out to report on")
    if config["train_on_held_out"] != "none":
        description += (f" (train_on_held_out {config['train_on_held_out']}: they train too, so their "
                        f"figures, best.pt and the temperature are training figures)")
    return train, val, held_out, description


# --------------------------------------------------------------------------------------------
# The loss, evaluation and samples

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


@torch.no_grad()
@in_eval_mode
def evaluate(model, data, config, device, show_progress):
    """-> {"val_bpd": mean bits/dim under the true label; with labels, "val_acc": the accuracy of
    argmax_c log p(x|c), "temperature": fit_temperature on these images, "val_ece": the ECE with
    it, "fitted_prior": fit_prior on these images as {"temperature", "log_prior"}}. In float32
    even when training uses bf16: bf16 moves log p(x|c) by tens of nats and flips predictions."""
    K, bs = config["num_classes"], config["eval_batch_size"]
    nll, log_likelihoods = [], []
    batches = range(0, len(data), bs)
    for start in tqdm(batches, desc="eval", unit="batch", leave=False, disable=not show_progress):
        x = dataset.to_model_input(data.images[start:start + bs]).to(device)
        if config["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if K:
            log_likelihoods.append(class_log_likelihoods(model, x, K).double().cpu())  # [B, K]
        else:
            nll.append(discretized_mix_logistic_nll(x, model(x, None)).double().cpu())
    if not K:
        return {"val_bpd": bits_per_dim(torch.cat(nll).mean(), data.images.shape[1:]).item()}
    ll, y = torch.cat(log_likelihoods), data.labels
    temperature = fit_temperature(ll, y)
    prior_temperature, log_prior = fit_prior(ll, y)
    return {"val_bpd": bits_per_dim(-ll.gather(1, y[:, None]).mean(), data.images.shape[1:]).item(),
            "val_acc": (ll.argmax(dim=1) == y).double().mean().item(), "temperature": temperature,
            "val_ece": calibration_metrics(log_posterior(ll, temperature=temperature).exp(), y)["ece"],
            "fitted_prior": {"temperature": prior_temperature, "log_prior": log_prior.tolist()}}


def start_wandb(config, run_id, log):
    """-> a wandb run (offline unless asked and logged in), or None; never stops training."""
    mode = config["wandb"]
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log("warning: wandb is not installed; not logging to wandb")
        return None
    if mode == "online":
        try:
            logged_in = wandb.login(prompt=False)
        except Exception:  # noqa: BLE001 - any failure means: no credentials
            logged_in = False
        if not logged_in:
            log("warning: wandb has no credentials (run `wandb login`); logging offline instead")
            mode = "offline"
    try:
        return wandb.init(project=config["wandb_project"], dir=config["out_dir"], id=run_id,
                          resume="allow", mode=mode, config=config)
    except Exception as err:  # noqa: BLE001 - logging must never stop training
        log(f"warning: wandb failed to start ({first_line(err)}); "
            f"not logging to wandb")
        return None


# --------------------------------------------------------------------------------------------
# Training

class Stop(Exception):
    """Ends the run with exit code args[0]."""


def previous_run_files(out_dir):
    """The files an earlier run left in out_dir: last.pt, metrics.jsonl, best.pt, its held-out
    splits and its sample grids."""
    if not os.path.isdir(out_dir):
        return []
    names = ["last.pt", "metrics.jsonl", "best.pt", os.path.join("splits", "val.csv"),
             os.path.join("splits", "report.csv")]
    names += sorted(name for name in os.listdir(out_dir)
                    if name.startswith("samples_epoch") and name.endswith(".png"))
    return [name for name in names if os.path.isfile(os.path.join(out_dir, name))]


def clear_previous_run(out_dir):
    """Delete what an earlier run left in out_dir, so that a fresh run's files describe that run
    alone: an old splits/report.csv would list images this run trains on. last.pt is replaced at
    the first save."""
    for name in previous_run_files(out_dir):
        if name != "last.pt":
            os.remove(os.path.join(out_dir, name))


def check_out_dir(config, state):
    """UsageError unless the run may write in its out_dir: a fresh run only where no earlier run
    left its files (or with --overwrite), a resumed one only beside checkpoints of its own run."""
    out_dir = config["out_dir"]
    if state is None:
        earlier = previous_run_files(out_dir)
        if earlier and not config["overwrite"]:
            raise UsageError(f"{out_dir} holds an earlier run's {', '.join(earlier)}: pass --resume to continue "
                             f"that run, --overwrite to start afresh, or another --out-dir")
        return
    for name in ("last.pt", "best.pt"):
        path = os.path.join(out_dir, name)
        if (os.path.isfile(path) and not same_file(path, config["resume"])
                and not same_lineage(load_checkpoint(path), state)):
            raise UsageError(f"{path} is another run's or a fork's than {config['resume']}; resuming there would "
                             f"replace that run's files: give another --out-dir")


def same_lineage(saved, resumed):
    """Whether two checkpoints were written by one run in one folder: an earlier checkpoint of a
    run may resume in its own folder (to go back to best.pt), but not in that of a fork, which keeps
    the run's wandb_id and writes its own out_dir."""
    def folder(state):
        return os.path.normpath(state.get("config", {}).get("out_dir", ""))
    return saved.get("wandb_id") == resumed.get("wandb_id") and folder(saved) == folder(resumed)


def cut_metrics_back(out_dir, step):
    """Drop the lines of <out_dir>/metrics.jsonl after `step`, where a resumed run starts: a run
    killed between an evaluation and its save would otherwise log those epochs twice."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        atomic_write(path, lambda f: f.write("".join(kept).encode()))


class Trainer:
    def __init__(self, config, resume_state):
        self.config = config
        self.rank, self.world_size, self.device = join_processes(config["device"])
        self.is_main, self.distributed = self.rank == 0, self.world_size > 1
        self.resume_state = resume_state
        self.signal_received = None
        self.started, self.elapsed_before = time.time(), 0.0
        self.max_time = parse_duration(config["max_time"])
        self.wandb_run = None
        self.evaluated_at = None  # (epoch, step) of the last evaluation, known on every rank

    def log(self, message):
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def setup(self):
        c = self.config
        fresh = self.resume_state is None
        self.train_data, self.val_data, self.held_out, description = load_data(c, self.is_main)
        seed_everything(c["seed"])
        self.model = build_model({k: c[k] for k in MODEL_DEFAULTS}).to(self.device)
        if c["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.resume_state is None:
            self.data_dependent_init()
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_multi_avg_fn(c["ema_decay"]), use_buffers=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=c["lr_decay"])
        self.progress = Progress(wandb_id=secrets.token_hex(4))
        seed_everything(c["seed"] + self.rank)  # dropout masks differ between processes
        if self.resume_state is not None:
            self.resume(self.resume_state)
            self.resume_state = None
        self.net = self.model  # what the training step calls; self.model stays the plain module
        self.loss = training_loss
        if self.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if c["compile"] and self.distributed:
            self.net = torch.compile(self.net, mode=c["compile_mode"])  # DDP's supported way
        elif c["compile"]:  # the network and its loss as one graph, or one CUDA graph
            self.loss = torch.compile(training_loss, mode=c["compile_mode"])
        amp = c["amp"] and native_bf16(self.device)
        if c["amp"] and not amp:
            self.log(f"amp: {self.device.type} has no native bf16 (on CPUs: AVX512-BF16 or AMX); "
                     f"training in float32")
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {n_params:,} parameters; data: {description}; device: {self.device}"
                 f"{f' x {self.world_size} processes' if self.distributed else ''}; out_dir: {c['out_dir']}")
        if self.is_main:
            remove_cut_short_writes(c["out_dir"])
            if fresh:
                clear_previous_run(c["out_dir"])
            else:
                cut_metrics_back(c["out_dir"], self.progress.step)
            self.write_splits()
            text = yaml.safe_dump(c, sort_keys=False)
            atomic_write(os.path.join(c["out_dir"], "config.yaml"), lambda f: f.write(text.encode()))
            self.wandb_run = start_wandb(c, self.progress.wandb_id, self.log)

    def write_splits(self):
        """<out_dir>/splits/val.csv and report.csv: the held-out images, for classify.py --csv."""
        for name, items in self.held_out.items():
            if items:
                text = "".join(f"{item_id},{label}\n" for item_id, label in items)
                atomic_write(os.path.join(self.config["out_dir"], "splits", f"{name}.csv"),
                             lambda f: f.write(text.encode()))

    def data_dependent_init(self):
        n = len(self.train_data)
        generator = torch.Generator().manual_seed(self.config["seed"])
        index = torch.randperm(n, generator=generator)[:min(n, max(self.config["batch_size"], 16))]
        x = dataset.to_model_input(self.train_data.images[index]).to(self.device)
        labels = self.train_data.labels[index].to(self.device) if self.config["num_classes"] else None
        self.model.eval()
        data_dependent_init(self.model, x, labels)
        self.model.train()

    # -- the step ------------------------------------------------------------------------------

    def train_step(self, x, y):
        """One optimisation step -> (the batch's bits/dim, averaged over processes; why to stop:
        'signal', 'time' or None). Raises Stop on a non-finite loss."""
        c = self.config
        x, y = self.prepare_batch(x, y)
        with self.autocast():
            loss, bpd = self.loss(self.net, x, y, c["num_classes"], c["cls_loss_weight"],
                                  c["cls_batch_size"])
        bpd, stop = self.agree_on_stopping(loss, bpd)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        self.progress.step += 1
        return bpd, stop

    def prepare_batch(self, x, y):
        c = self.config
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        # Augmentation has its own generators, seeded by (seed, step, rank): the dropout stream
        # stays as without it, and a resumed run draws the same flips and shifts.
        if c["hflip"]:
            seed = np.random.SeedSequence([c["seed"], self.progress.step, self.rank]).generate_state(1)[0]
            x = dataset.random_hflip(x, int(seed))
        if c["shift"]:
            seed = np.random.SeedSequence([c["seed"], self.progress.step, self.rank, 1]).generate_state(1)[0]
            x = dataset.random_shift(x, c["shift"], int(seed))
        if c["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def agree_on_stopping(self, loss, bpd):
        """One all-reduce per step carries the loss and the stop flags, so that every process
        stops together. -> (mean bits/dim over processes, 'signal', 'time' or None)."""
        local = torch.tensor([float(self.signal_received is not None), float(self.time_is_up())],
                             dtype=torch.float64, device=self.device)
        flags = torch.cat([bpd.detach().double().view(1), (~torch.isfinite(loss.detach())).double().view(1),
                           local])  # [bits/dim, non-finite, signalled, time is up]
        if self.distributed:
            dist.all_reduce(flags)
        bpd_sum, nonfinite, signalled, time_up = flags.tolist()
        if nonfinite:
            self.log(f"error: the loss became {loss.item()} at epoch {self.progress.epoch + 1}, step "
                     f"{self.progress.step + 1}; stopping without saving (last.pt and best.pt in "
                     f"{self.config['out_dir']} are left as they were). Try a lower lr or a grad_clip.")
            raise Stop(EXIT_NONFINITE)
        return bpd_sum / self.world_size, "signal" if signalled else "time" if time_up else None

    def time_is_up(self):
        return self.max_time is not None and time.time() - self.started >= self.max_time

    # -- the loop ------------------------------------------------------------------------------

    def run(self):
        self.setup()
        c, p = self.config, self.progress
        if p.epoch >= c["epochs"] and p.batch_in_epoch == 0:
            self.log(f"nothing to do: the run has already trained {p.epoch} of {c['epochs']} epochs "
                     f"(pass --epochs N to train longer)")
            return 0
        with self.signals_caught():
            while p.epoch < c["epochs"]:
                stopped = self.run_epoch()
                if stopped == "signal":
                    self.save("last.pt")
                    self.log(f"stopped by signal {self.signal_received}: saved "
                             f"{os.path.join(c['out_dir'], 'last.pt')}; continue with --resume")
                    raise Stop(128 + self.signal_received)
                if stopped == "time":
                    self.log(f"max_time {c['max_time']} reached after {p.epoch} epochs and "
                             f"{p.batch_in_epoch} batches: evaluating and saving")
                    self.evaluate_and_log()
                    self.save("last.pt")
                    return 0
                self.end_of_epoch()
            if self.evaluated_at != (p.epoch, p.step):  # a resumed run with fewer epochs than it had
                self.evaluate_and_log()
                self.save("last.pt")
            if c["samples_per_class"] and (not c["sample_every"] or p.epoch % c["sample_every"]):
                self.write_samples()  # the last grid, unless end_of_epoch just drew it
        return 0

    def run_epoch(self):
        """-> None when the epoch completed, or 'signal' / 'time' when it stopped early."""
        c, p = self.config, self.progress
        if p.batch_in_epoch == 0:  # train_bpd is the mean over this epoch's batches alone
            p.epoch_bpd_sum, p.epoch_batches = 0.0, 0
        batches = self.batches(p.epoch)[p.batch_in_epoch:]
        loader = torch.utils.data.DataLoader(
            self.train_data, batch_sampler=batches, num_workers=c["num_workers"],
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(c["seed"] + p.epoch))  # not the global RNG
        bar = tqdm(total=len(batches) + p.batch_in_epoch, initial=p.batch_in_epoch, unit="batch",
                   desc=f"epoch {p.epoch + 1}/{c['epochs']}", leave=False, disable=not (self.is_main and c["progress"]))
        self.model.train()
        with bar:
            for x, y in loader:
                bpd, stop = self.train_step(x, y)
                p.batch_in_epoch, p.epoch_bpd_sum, p.epoch_batches = \
                    p.batch_in_epoch + 1, p.epoch_bpd_sum + bpd, p.epoch_batches + 1
                bar.update(1)
                bar.set_postfix(bpd=f"{bpd:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if stop:
                    return stop
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        return None

    def batches(self, epoch):
        # DistributedSampler shuffles epoch e with seed + e, so seed s + 1 replays seed s's orders
        # one epoch later (dropout, augmentation and initialisation still differ). Kept: another
        # derivation would change every documented run's batches.
        sampler = torch.utils.data.distributed.DistributedSampler(
            self.train_data, num_replicas=self.world_size, rank=self.rank, shuffle=True,
            seed=self.config["seed"], drop_last=False)
        sampler.set_epoch(epoch)
        order = list(sampler)
        bs = self.config["batch_size"]
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if self.config["compile"] and len(batches) > 1 and len(batches[-1]) < bs:
            batches.pop()  # one batch shape, one compiled graph: a smaller last batch compiles again
        return batches

    def end_of_epoch(self):
        c, p = self.config, self.progress
        last = p.epoch == c["epochs"]
        if p.epoch % c["eval_every"] == 0 or last:
            self.evaluate_and_log()
        if c["samples_per_class"] and c["sample_every"] and p.epoch % c["sample_every"] == 0:
            self.write_samples()
        if p.epoch % c["save_every"] == 0 or last:
            self.save("last.pt")

    def evaluate_and_log(self):
        """Evaluate the EMA weights on the validation set (rank 0), log, and update best.pt."""
        c, p = self.config, self.progress
        self.evaluated_at, better = (p.epoch, p.step), False
        if self.is_main:
            train_bpd = p.epoch_bpd_sum / p.epoch_batches if p.epoch_batches else None
            val = {"val_bpd": None, "val_acc": None}
            if self.val_data is not None:
                val.update(evaluate(self.ema.module, self.val_data, c, self.device, show_progress=c["progress"]))
            p.fitted_prior = val.pop("fitted_prior", None)  # saved with last.pt and best.pt, not a metric
            p.metrics = {"epoch": p.epoch, "step": p.step, "train_bpd": train_bpd, **val,
                         "lr": self.scheduler.get_last_lr()[0], "seconds": round(self.elapsed(), 2)}
            p.temperature = val.get("temperature")  # saved with last.pt and best.pt
            with open(os.path.join(c["out_dir"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps(p.metrics) + "\n")
            fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
            self.log(f"epoch {p.epoch} step {p.step}: train {fmt(train_bpd, '.4f')} bpd, "
                     f"val {fmt(val['val_bpd'], '.4f')} bpd, val acc {fmt(val['val_acc'], '.4f')}"
                     + (f", T {p.temperature:.3g} (ECE {val['val_ece']:.3f})" if p.temperature else ""))
            if self.wandb_run is not None:
                self.wandb_run.log({k: v for k, v in p.metrics.items() if v is not None}, step=p.step)
            metric = "val_acc" if c["best_metric"] == "val_acc" and val["val_acc"] is not None else "val_bpd"
            value = p.metrics[metric]
            better = value is not None and (
                p.best is None or (value > p.best if metric == "val_acc" else value < p.best))
            if better:
                p.best = value
        flag = torch.tensor([float(better)], device=self.device)
        if self.distributed:
            dist.broadcast(flag, 0)
        if flag.item():
            self.save("best.pt")

    def write_samples(self):
        if self.is_main:
            import torchvision
            c = self.config
            K, n = c["num_classes"], c["samples_per_class"]  # one row of n per class
            labels = torch.arange(K).repeat_interleave(n) if K else None
            images = generate(self.ema.module, labels, seed=c["seed"], n=None if K else n)  # cached sampler
            path = os.path.join(c["out_dir"], f"samples_epoch{self.progress.epoch:04d}.png")
            torchvision.utils.save_image(images.float() / 255, path, nrow=n)
            self.log(f"samples: {path}")
            if self.wandb_run is not None:
                import wandb
                self.wandb_run.log({"samples": wandb.Image(path)}, step=self.progress.step)
        if self.distributed:
            dist.barrier()

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started

    # -- state ---------------------------------------------------------------------------------

    def held_out_digest(self):
        return {name: dataset.items_digest(items) for name, items in self.held_out.items()}

    def check_same_held_out(self, state):
        """UsageError unless the images held out now are those the run held out (checkpoints from
        before the fingerprint are not checked): else it would validate on images it trained on."""
        stored, now = state.get("held_out_digest") or {}, self.held_out_digest()
        changed = [name for name in stored if stored[name] != now.get(name)]
        if changed:
            raise UsageError(f"the {' and '.join(changed)} images are not those the run held out, so it would "
                             f"evaluate on images it trained on: keep seed, split_seed, val_fraction, "
                             f"report_fraction, report_seed and the data as they were (its validation split "
                             f"used seed {validation_seed(state['config'])}: --split-seed fixes it)")

    def save(self, name):
        """Write <out_dir>/<name> on rank 0, with every rank's RNG state."""
        rng, per_rank = rng_state(), None
        if self.distributed:
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, rng)
        if self.is_main:
            self.progress.elapsed = self.elapsed()
            state = training_state(self.model, self.ema, self.optimizer, self.scheduler, self.config,
                                   self.progress, rng, per_rank, self.world_size, self.held_out_digest())
            save_checkpoint(os.path.join(self.config["out_dir"], name), state)

    def resume(self, state):
        c, stored = self.config, state["config"]
        self.check_same_held_out(state)
        p = self.progress = restore_training_state(state, self.model, self.ema, self.optimizer,
                                                   self.scheduler, c["resume"])
        self.elapsed_before = p.elapsed
        if p.metrics is not None:
            self.evaluated_at = (p.metrics["epoch"], p.metrics["step"])
        restore_rng(state, self.rank, self.world_size)
        # A new lr (or lr_restart) restarts the decay from it, a new lr_decay decays at that rate
        # from here on: the optimizer's and scheduler's states would silently keep the old ones.
        if c["lr_restart"] or c["lr"] != stored.get("lr"):
            current = self.optimizer.param_groups[0]["lr"]
            for group in self.optimizer.param_groups:
                group["lr"] = c["lr"]
            self.scheduler.base_lrs = [c["lr"]] * len(self.optimizer.param_groups)
            self.log(f"lr restarts at {c['lr']} (was {current:.3g} at step {p.step}, "
                     f"{stored.get('lr')} when the run began)")
        self.scheduler.gamma = c["lr_decay"]
        if c["best_metric"] != stored.get("best_metric", DEFAULTS["best_metric"]) and p.best is not None:
            p.best = None  # a value of the old metric: the next evaluation starts best.pt afresh
            self.log(f"best_metric is now {c['best_metric']}: best.pt restarts at the next evaluation")
        self.log(f"resumed from {c['resume']}: epoch {p.epoch}, batch {p.batch_in_epoch}, step {p.step}")

    @contextlib.contextmanager
    def signals_caught(self):
        """SIGINT and SIGTERM end the run after the step under way, with last.pt saved; a second
        signal stops at once. The wandb run is closed on the way out."""
        def handler(signum, frame):
            if self.signal_received is not None:
                raise KeyboardInterrupt
            self.signal_received = signum
            self.log(f"signal {signum} received: saving last.pt after this step")
        previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)
            if self.wandb_run is not None:
                self.wandb_run.finish()


def main(argv=None):
    code, trainer = 0, None
    try:
        config, state = resolve_config(sys.argv[1:] if argv is None else argv)
        check_output("--out-dir", config["out_dir"], folder=True)
        check_out_dir(config, state)
        trainer = Trainer(config, state)
        code = trainer.run()
    except UsageError as err:  # also DataError and CheckpointError
        code = report(PROG, err)
    except Stop as stop:
        code = stop.args[0]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        del trainer  # DDP holds the process group: release it before leaving the group
        leave_processes(succeeded=code == 0)
    return code


if __name__ == "__main__":
    speed_up_cpu()  # faster on CPUs: see config
    run_cli(main)
