"""The `train` command: SASR training from an nnU-Net raw dataset or a preprocessed cache, to a model bundle.

Every hyper-parameter has its default in `TrainConfig`; a JSON config overrides any of them. Runs under
`torchrun --nproc_per_node N` with DistributedDataParallel (gloo on CPU, nccl on CUDA): every rank draws
its own patches, rank 0 logs, validates and writes. Training from a cache folder never imports
SimpleITK, so a cache made on one machine trains on another that has only torch and numpy.
"""

from __future__ import annotations

import random
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.datasets import load_split_file
from ..model.bundle import save_bundle
from ..runtime.errors import UserError
from ..runtime.progress import Progress
from .averaging import WeightAverage
from .build import build_loss, build_network, initialise_from, lr_lambda
from .config import TrainConfig
from .curves import write_plot
from .runtime import Runtime, amp_settings, hardware, memory_format, use_channels_last
from .setup import (
    check_against_data,
    check_resumed_data,
    choose_split,
    make_sampler,
    open_training_cache,
    resolve_config,
)
from .state import CsvLog, StopFlag, atomic_torch_save, check_output, rng_state, set_rng_state
from .teachers import Teachers, distillation_loss
from .validation import validate

# This many steps running that could not be applied (loss or gradient not a number) is a diverged run,
# not fp16's scaler finding its scale (it skips a handful of steps at the start).
DIVERGED_STEPS = 25


class Trainer:
    """One training run: set up from the options (or the checkpoint it resumes), `train()` runs the loop,
    validates, checkpoints, and writes the bundle from the best validation."""

    def __init__(self, args, output: Path, runtime: Runtime, progress: Progress):
        self.output, self.runtime, self.progress = output, runtime, progress
        resume_from = check_output(output, args.resume)
        checkpoint = torch.load(resume_from, map_location="cpu", weights_only=False) if resume_from else None
        self.cfg, self.ablation = cfg, ablation = resolve_config(args, output, checkpoint)
        if checkpoint is None and (args.split_file or cfg.split_file):
            load_split_file(args.split_file or cfg.split_file)  # before the preprocessing, not after it
        if runtime.world > 1:
            dist.barrier()  # every rank has checked --output before rank 0 writes into it
        if runtime.main:
            output.mkdir(parents=True, exist_ok=True)
        self.cache = open_training_cache(args, cfg, runtime, progress)
        self.prep = prep = dict(self.cache.prep)
        prep["patch_size_lr"] = cfg.patch_size(prep["spatial_dims"], prep.get("lr_longer_side"))
        flip_axes = check_against_data(cfg, prep, ablation)
        if checkpoint:
            check_resumed_data(checkpoint, self.cache, args.dataset)
        self.split = checkpoint["split"] if checkpoint else choose_split(cfg, self.cache, args.split_file)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self._build(args, checkpoint)
        self.sampler = make_sampler(cfg, self.cache, self.split["train"], prep, flip_axes)
        self.log = CsvLog(output / "log.csv", self.step if checkpoint else None) if runtime.main else None

    def _build(self, args, checkpoint: dict | None) -> None:
        """Network, loss, precision, optimiser and schedule; restored from the checkpoint when resuming."""
        cfg, device = self.cfg, self.runtime.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest convolution once
        self.net = build_network(cfg, self.prep, self.ablation)
        if checkpoint:
            self.init = checkpoint.get("init")
        else:
            if args.warm_start:
                self.init = initialise_from(self.net, args.warm_start, shared_only=True)
                shared = self.init["warm_start"]
                self.progress.log(
                    f"warm start: {shared['tensors_copied']} of {shared['tensors_total']} tensors "
                    f"from {args.warm_start}"
                )
            else:
                self.init = initialise_from(self.net, args.init) if args.init else None
        self.loss_fn = build_loss(cfg, self.ablation)
        self.teachers = (
            Teachers(cfg.teachers, self.prep, device) if cfg.teachers and cfg.loss_kd > 0 else None
        )
        self.amp_dtype, needs_scaler = amp_settings(cfg, device)
        self.channels_last = use_channels_last(cfg, device, self.prep["spatial_dims"])
        self.precision = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32"
        self.fmt = memory_format(self.prep["spatial_dims"], self.channels_last)
        self.net.to(device=device, memory_format=self.fmt)
        self.average = WeightAverage(self.net, cfg.ema_decay) if cfg.ema_decay else None
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.start_time, self.elapsed_before = time.monotonic(), 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, cfg.max_steps, self.time_fraction)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
        self.step, self.best, self.best_step, self.best_validation = 0, -1.0, 0, {}
        self.validated_step = 0
        if checkpoint:
            self._restore(checkpoint)
        self.model = self.net
        if self.runtime.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)

    def _restore(self, checkpoint: dict) -> None:
        self.net.load_state_dict(checkpoint["model"])
        if self.average is not None:
            self.average.load_state_dict(checkpoint["average"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step, self.best = checkpoint["step"], checkpoint["best_metric"]
        self.best_step = checkpoint["best_step"]
        self.best_validation = checkpoint.get("best_validation", {})
        # Checkpoints from before it: validating a finished run's last step again costs one validation.
        self.validated_step = checkpoint.get("validated_step", 0)
        self.elapsed_before = checkpoint["elapsed_s"]
        runtime = self.runtime
        if runtime.world == checkpoint.get("world", 1):
            rngs = checkpoint["rng"]
            set_rng_state(rngs[runtime.rank] if runtime.rank < len(rngs) else rngs[0])
        self.progress.log(f"resuming {self.output} at step {self.step}")

    def elapsed(self) -> float:
        """Seconds of training so far, the resumed runs' included."""
        return self.elapsed_before + time.monotonic() - self.start_time

    def time_fraction(self) -> float:
        return self.elapsed() / 60 / self.cfg.max_minutes if self.cfg.max_minutes else 0.0

    def save(self, name: str, collective: bool = True, resumable: bool = True) -> None:
        """Rank 0 writes `name`; with `collective` every rank must call it (their RNG states are gathered).

        Not `resumable` (the best validation's weights, which only the bundle reads): without the
        optimiser's moments, and with the average alone where there is one, a quarter of the size of a
        resumable checkpoint; a run's state committed between sessions holds both.
        """
        runtime = self.runtime
        rngs = [rng_state()]
        if collective and runtime.world > 1:
            rngs = [None] * runtime.world
            dist.all_gather_object(rngs, rng_state())
        if not runtime.main:
            return
        state = {
            "model": self.net.state_dict(),
            "average": None if self.average is None else self.average.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_metric": self.best,
            "best_step": self.best_step,
            "best_validation": self.best_validation,
            "validated_step": self.validated_step,
            "elapsed_s": self.elapsed(),
            "rng": rngs,
            "world": runtime.world,
            "config": asdict(self.cfg),
            "ablation": self.ablation,
            "split": self.split,
            "prep": self.prep,
            "init": self.init,
        }
        if not resumable:
            for key in ("optimizer", "scheduler", "scaler", "rng") + (
                ("model",) if self.average is not None else ()
            ):
                del state[key]
        atomic_torch_save(state, self.output / name)

    def _describe(self) -> str:
        prep, runtime, cfg = self.prep, self.runtime, self.cfg
        return (
            f"training {self.ablation} on {len(self.split['train'])} cases (validating on "
            f"{len(self.split['val'])}), {prep['spatial_dims']}D patches {prep['patch_size_lr']} LR -> "
            f"x{prep['scale']}, batch {cfg.batch_size}"
            f"{f' x {runtime.world} processes' if runtime.world > 1 else ''}, device {runtime.device}, "
            f"amp {self.precision}, channels-last {'on' if self.channels_last else 'off'}"
        )

    def train(self) -> int:
        """The loop: 0 when done (bundle written), 130 when stopped (checkpoint written)."""
        from ..data.sampling import batches

        cfg, runtime = self.cfg, self.runtime
        # A resumed run draws a fresh (still reproducible) patch stream: worker generators cannot be saved.
        stream = batches(
            self.sampler,
            cfg.batch_size,
            cfg.workers,
            cfg.seed + 7919 * self.step,
            runtime.rank,
            runtime.device.type == "cuda",
        )
        self.start_time = time.monotonic()
        self.progress.log(self._describe())
        window = _Window()
        last_save = time.monotonic()
        skipped = 0
        self.model.train()
        if self.step >= cfg.max_steps and self.split["val"] and self.validated_step < self.step:
            # Stopped on its last step and resumed: that step's validation had been left out of the bundle.
            row = self._validate(None)
            if self.log is not None and row:
                self.log.add(row)
        with StopFlag() as stop:
            while self.step < cfg.max_steps:
                terms = self._optimise(next(stream))
                self.step += 1
                skipped = 0 if terms.pop("applied") else skipped + 1
                window.add(terms)
                if skipped >= DIVERGED_STEPS:
                    raise UserError(
                        f"training diverged: the loss or its gradient has not been a number since step "
                        f"{self.step - skipped + 1}; lower learning_rate (now {cfg.learning_rate:g}) and "
                        "start again (no bundle written)"
                    )
                stopped, timed_out, save_due = self._flags(stop, last_save)
                self._show(terms, window.speed())
                last_step = self.step >= cfg.max_steps or timed_out
                row = None
                if self.step % cfg.log_every == 0 or last_step or stopped:
                    row = window.row(self.step, round(self.elapsed(), 1), self.scheduler.get_last_lr()[0])
                if stopped:
                    if self.log is not None and row:
                        self.log.add(row)
                    self.save("checkpoint_last.pt")
                    self.progress.log(
                        f"stopped at step {self.step}; checkpoint written. "
                        f"Continue with --resume --output {self.output}"
                    )
                    return 130
                if self.split["val"] and (self.step % cfg.val_every == 0 or last_step):
                    row = self._validate(row)
                if self.log is not None and row:
                    self.log.add(row)
                if self.step % cfg.val_every == 0 or last_step or save_due:
                    self.save("checkpoint_last.pt")
                    last_save = time.monotonic()
                if last_step:
                    break
        self._finish()
        return 0

    def _optimise(self, batch) -> dict[str, float]:
        """One optimiser step on `batch`; returns the loss terms."""
        from ..data.sampling import lr_from_hr

        device, amp_dtype = self.runtime.device, self.amp_dtype
        hr_image, hr_mask, *made = batch
        hr_image = hr_image.to(device, non_blocking=True)
        hr_mask = hr_mask.to(device, non_blocking=True)
        lr = made[0].to(device, non_blocking=True) if made else lr_from_hr(hr_image, self.prep["scale"])
        lr = lr.contiguous(memory_format=self.fmt)
        taught = self.teachers(lr) if self.teachers is not None else None
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = self.model(lr)
            loss, terms = self.loss_fn(out, hr_mask, hr_image)
            if taught is not None:
                kd = distillation_loss(out.mask, taught)
                loss = loss + self.cfg.loss_kd * kd
                terms["kd"] = float(kd.detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        # A non-finite loss or gradient (a bf16 overflow, a degenerate batch) is not applied: one such
        # step would turn every weight into NaN for the rest of the run. (fp16's scaler skips these
        # steps itself.)
        finite = bool(torch.isfinite(norm) and torch.isfinite(loss.detach()))
        if self.scaler.is_enabled() or finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            self.average.update(self.net)
        terms["loss"] = float(loss.detach())
        terms["applied"] = finite
        return terms

    def _flags(self, stop: StopFlag, last_save: float) -> tuple[bool, bool, bool]:
        """(stop requested, time budget spent, checkpoint due), agreed by every rank."""
        cfg = self.cfg
        minutes = self.elapsed() / 60
        since_save = (time.monotonic() - last_save) / 60
        flags = torch.tensor(
            [
                float(stop.requested),
                float(cfg.max_minutes is not None and minutes >= cfg.max_minutes),
                float(cfg.checkpoint_minutes is not None and since_save >= cfg.checkpoint_minutes),
            ]
        )
        if self.runtime.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stopped, timed_out, save_due = (bool(f) for f in flags)
        return stopped, timed_out, save_due

    def _show(self, terms: dict[str, float], speed: float) -> None:
        if not self.runtime.main:
            return
        cfg = self.cfg
        fraction = self.step / cfg.max_steps
        if cfg.max_minutes:
            fraction = max(fraction, self.elapsed() / 60 / cfg.max_minutes)
        shown = " ".join(f"{k} {v:.3f}" for k, v in terms.items() if k != "loss")
        self.progress.update(
            "train",
            fraction,
            f"step {self.step}/{cfg.max_steps} loss {terms['loss']:.3f} ({shown}) {speed:.2f} steps/s",
        )

    def _validate(self, row: dict | None) -> dict | None:
        """Rank 0 validates (and keeps the best weights); returns the log row with the validation Dice."""
        self.validated_step = self.step
        if self.runtime.main:
            result = validate(
                self.net if self.average is None else self.average.net,
                self.cache,
                self.split["val"],
                self.prep,
                self.cfg,
                self.runtime.device,
                self.amp_dtype is not None,
                self.progress,
            )
            self.model.train()
            row = row or {"step": self.step, "time_s": round(self.elapsed(), 1)}
            row["val_dice"] = result["dice_mean"]
            inputs = result.get("per_input", {})
            shown = "; ".join(f"{name} {d['dice_mean']:.4f}" for name, d in inputs.items())
            cases = ", ".join(f"{case} {dice:.3f}" for case, dice in result["per_case"].items())
            self.progress.log(
                f"step {self.step}: validation Dice {result['dice_mean']:.4f}"
                + (f" ({shown})" if shown else "")
                + f" [{cases}]"
            )
            if result["dice_mean"] > self.best:
                self.best, self.best_step, self.best_validation = result["dice_mean"], self.step, result
                self.save("checkpoint_best.pt", collective=False, resumable=False)
        # Rank 0's best metric is what all ranks save and compare.
        if self.runtime.world > 1:
            shared = [self.best, self.best_step]
            dist.broadcast_object_list(shared, src=0)
            self.best, self.best_step = shared
        return row

    def _finish(self) -> None:
        """Curves, and the bundle from the best validation's weights (rank 0)."""
        runtime, output = self.runtime, self.output
        wall = self.elapsed()
        if runtime.main:
            write_plot(output / "curves.png", self.log.rows, self.progress)
            if not self.split["val"]:
                self.best_step = self.step
                # Nothing to validate on: the last weights.
                self.save("checkpoint_best.pt", collective=False, resumable=False)
            best_state = torch.load(output / "checkpoint_best.pt", map_location="cpu", weights_only=False)
            average = best_state.get("average")
            weights = best_state["model"] if average is None else average["weights"]
            if not all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()):
                raise UserError(
                    f"the weights of step {best_state['step']} hold values that are not numbers (training "
                    "diverged); lower learning_rate and start again (no bundle written)"
                )
            self.net.load_state_dict(weights)
            validation = dict(best_state.get("best_validation") or {}, step=best_state["step"])
            write_bundle(
                output, self.net, self.cfg, self.prep, self._provenance(best_state, wall), validation
            )
            self.progress.log(
                f"done: {self.step} steps in {wall / 60:.1f} min; best validation Dice "
                f"{self.best_validation.get('dice_mean', float('nan')):.4f} at step {self.best_step}; "
                f"bundle in {output}"
            )
        if runtime.world > 1:
            dist.barrier()

    def _provenance(self, best_state: dict, wall: float) -> dict:
        """The card's "training" section."""
        return {
            "command": command_line(self.runtime.world),
            "dataset": self.cache.meta["dataset"]["name"],
            "cache": str(self.cache.folder),
            "split": self.split,
            "steps": best_state["step"],  # of the weights in the bundle (the best validation)
            "steps_total": self.step,
            "wall_time_s": round(wall, 1),
            "hardware": hardware(self.runtime.device),
            "processes": self.runtime.world,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "torch": torch.__version__,
            "ablation": self.ablation,
            "config": asdict(self.cfg),
            "initialised_from": self.init,
            "teachers": self.teachers.sources if self.teachers is not None else [],
        }


class _Window:
    """Loss terms and speed since the last log row."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.start, self.steps = time.monotonic(), 0

    def add(self, terms: dict[str, float]) -> None:
        self.steps += 1
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def speed(self) -> float:
        return self.steps / max(1e-9, time.monotonic() - self.start)

    def row(self, step: int, time_s: float, lr: float) -> dict:
        """The log row of the window's means; starts a new window."""
        n = max(1, self.steps)
        row = {"step": step, "time_s": time_s, "lr": f"{lr:.3g}", "steps_per_s": round(self.speed(), 3)}
        row |= {k: round(v / n, 5) for k, v in self.sums.items()}
        self.sums, self.start, self.steps = {}, time.monotonic(), 0
        return row


def command_line(world: int) -> str:
    """How this run was started, as a user would retype it."""
    program = {"__main__.py": "python -m SASSRSegmentLib", "train.py": "python -m SASSRSegmentLib.train"}
    prog = program.get(Path(sys.argv[0]).name, Path(sys.argv[0]).name)
    if world > 1:
        prog = f"torchrun --nproc_per_node {world} -m {prog.removeprefix('python -m ')}"
    return shlex.join([prog, *sys.argv[1:]]).replace(f"'{prog}'", prog, 1)


def write_bundle(output: Path, net, cfg: TrainConfig, prep: dict, training: dict, validation: dict) -> None:
    """model.pt (fp16 state dict) + model.json (the card) in `output`."""
    card = {
        "name": cfg.name,
        "description": cfg.description,
        "modality": cfg.modality,
        "task": cfg.task,
        "preprocessing": prep,
        "threshold": cfg.threshold,
        "training": training,
        "validation": validation,
        "licence_note": cfg.licence_note,
    }
    save_bundle(output, net.float().cpu().eval(), card, half=True)
