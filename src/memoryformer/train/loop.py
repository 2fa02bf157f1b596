"""The training loop, in phases: setup, resume, step, evaluate, save, finish (docs/training.md).

    from memoryformer import ModelConfig
    from memoryformer.train import TrainConfig, train
    result = train(ModelConfig.from_preset("mf-demo"), TrainConfig(max_steps=500, batch_size=16),
                   "data/tokens", "runs/mf-demo")
    result.losses, result.evals, result.val_ppl, result.tokens_per_s

`Trainer.run` is the whole loop; each phase is one method. Under torchrun every rank runs the same
phases; rank 0 alone writes files and holds the run directory's lock.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memoryformer.convert.distill import distillation_loss, teacher_logits
from memoryformer.core.config import ModelConfig
from memoryformer.data.fingerprint import data_fingerprint, fingerprint_mismatch
from memoryformer.kernels.grad_norms import GradNormTally
from memoryformer.progress import Progress
from memoryformer.train import checkpoint as ckpt
from memoryformer.train import distributed as D
from memoryformer.train import sharded as S
from memoryformer.train.config import RECIPE_FIELDS, TrainConfig, paper_lr
from memoryformer.train.files import remove_stale_temporaries
from memoryformer.train.lock import RunLock
from memoryformer.train.metrics import MetricsLog, StepStats, flops_per_token
from memoryformer.train.optim import (
    build_optimizer,
    build_scheduler,
    clip_and_step,
    clip_gradients,
    fused_adamw_supported,
    restore_schedule,
)
from memoryformer.train.result import TrainResult
from memoryformer.train.signals import StopSignals
from memoryformer.train.validation import autocast, validation_loss

OnEval = Callable[[nn.Module, int], dict[str, float]]


@dataclass
class Due:
    """What the loop does after a step."""

    log: bool = False
    evaluate: bool = False
    save: bool = False
    stop: str | None = None  # why the run stops after this step, or None


class Trainer:
    """One call of train(): the model, optimizer, data position and logs of a run, and its phases."""

    def __init__(self, model_config: ModelConfig, tc: TrainConfig, data, out: Path, env: D.DistEnv, *,
                 make_model: Callable[[], nn.Module], on_eval: OnEval | None, progress: bool, verbose: bool,
                 resume_hint: str = "continue with --resume") -> None:
        self.model_config, self.tc, self.data, self.out, self.env = model_config, tc, data, out, env
        self.make_model, self.on_eval, self.verbose = make_model, on_eval, verbose
        self.resume_hint = resume_hint  # how the stop line tells the user to continue
        self.device = env.device
        self.precision = tc.resolved_precision(self.device)
        self.sharded = tc.fsdp and env.distributed
        self.signals = StopSignals()
        self.bar = Progress(tc.max_steps, "train", unit="steps", enabled=False)
        self.show_progress = progress and env.is_main
        self.log: MetricsLog | None = None
        self.step = 0
        self.saved_step = -1  # the step of the last checkpoint this call wrote or resumed from
        self.abandoned = False  # a second Ctrl-C stopped the run without a checkpoint
        self.wall_start = time.perf_counter()
        self.last_save = time.monotonic()
        self.elapsed_before = 0.0

    def say(self, message: str) -> None:
        if self.verbose and self.env.is_main:
            self.bar.write(message)

    def elapsed(self) -> float:
        """Wall-clock seconds of the whole run, earlier (resumed) parts included."""
        return self.elapsed_before + time.perf_counter() - self.wall_start

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self, resume_candidates: list[Path] | None, stop_at_step: int | None) -> TrainResult:
        """setup, resume, then steps with their log / evaluate / save / stop actions, then finish."""
        self.setup()
        if resume_candidates:
            self.resume(resume_candidates)
        self.open_run_dir()
        with self.signals:
            try:
                self.train_model.train()
                while self.step < self.tc.max_steps:
                    self.train_step()
                    due = self.due(stop_at_step)
                    if due.log:
                        self.log_interval()
                    if due.evaluate:
                        self.evaluate()
                    if due.save:
                        self.save()
                        due.stop = due.stop or self.stop_requested_during_save()
                    if due.evaluate or due.save:
                        self.stats.restart_clock()
                    if due.stop:
                        self.say(f"{due.stop} at step {self.step}; checkpoint {self.result.checkpoint}; "
                                 f"{self.resume_hint}")
                        break
                self.log_interval()
                if self.saved_step != self.step:  # resumed a finished run, or max_steps already reached
                    self.save()
            except KeyboardInterrupt:  # a second Ctrl-C outside a write: stop now, keep the last checkpoint
                self.abandon()
            finally:
                self.close_logs()
            return self.finish()

    def due(self, stop_at_step: int | None) -> Due:
        """Decide the actions after this step; every rank reaches the same decision."""
        tc, step = self.tc, self.step
        signalled, clock = self.agree(self.signals.stopping, self.save_clock_ran_out())
        last = step == tc.max_steps
        paused = stop_at_step is not None and step >= stop_at_step and not last
        stop = (f"stopped by {self.signals.name or 'a signal on another rank'}" if signalled
                else "stopped (stop_at_step)" if paused else None)
        evaluate = not signalled and (last or bool(tc.eval_every and step % tc.eval_every == 0))
        save = bool(stop) or last or clock or bool(tc.ckpt_every and step % tc.ckpt_every == 0)
        if signalled:
            self.result.interrupted = self.signals.name or "signal on another rank"
        return Due(log=step % tc.log_every == 0 or evaluate or save, evaluate=evaluate, save=save, stop=stop)

    def save_clock_ran_out(self) -> bool:
        minutes = self.tc.ckpt_every_minutes
        return bool(minutes) and time.monotonic() - self.last_save >= 60.0 * minutes

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag True on every rank when it is True on any rank (one all-reduce)."""
        if not self.env.distributed:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        return [bool(v > 0) for v in D.all_reduce(t, self.env, "max").tolist()]

    def stop_requested_during_save(self) -> str | None:
        """A signal that arrived while the checkpoint was written stops the run now: that checkpoint is
        at this step, so nothing is lost."""
        if self.agree(self.signals.stopping)[0]:
            self.result.interrupted = self.signals.name or "signal on another rank"
            return f"stopped by {self.result.interrupted}"
        return None

    # ---- setup -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Model (compiled, DDP- or FSDP2-wrapped), optimizer, schedule, scaler, sampler, result."""
        tc, env = self.tc, self.env
        if tc.fsdp and not env.distributed:
            self.say("--fsdp has no effect in a single process (launch with torchrun for sharding)")
        ckpt.seed_everything(tc.seed)
        self.core = D.build_sharded(self.make_model, env) if self.sharded else self.make_model().to(self.device)
        self.fast = torch.compile(self.core) if tc.compile else self.core
        self.train_model = D.wrap_ddp(self.fast, env) if env.distributed and not self.sharded else self.fast
        self.optimizer = build_optimizer(self.core, tc, tc.lr,
                                         fused=fused_adamw_supported(self.device) and not self.sharded)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.sampler = self.data.sampler("train", tc.batch_size, tc.seq_len, seed=tc.seed, shuffle=tc.shuffle,
                                         rank=env.rank, world_size=env.world_size)
        if tc.init_from:
            self.load_initial_weights(tc.init_from)
        self.teacher = load_teacher(tc.teacher, self.model_config, self.device) if tc.teacher else None
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        self.data_fingerprint = data_fingerprint(self.data.path)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * env.world_size * tc.seq_len
        self.fpt = flops_per_token(self.model_config, tc.seq_len, self.core if not self.sharded else None)
        self.stats = StepStats(self.tokens_per_step)
        self.result = TrainResult(str(self.out), self.model_config.to_dict(), tc.to_dict(),
                                  tokens_per_step=self.tokens_per_step, flops_per_token=self.fpt,
                                  world_size=env.world_size, precision=self.precision)

    def load_initial_weights(self, source: str) -> None:
        """Start from another run's weights (a new run only: a resume overwrites them)."""
        if self.sharded:
            raise ValueError("--init-from needs a single process or DDP (load the weights, then shard)")
        initial, _ = ckpt.load_model(source)
        if initial.config.to_dict() != self.model_config.to_dict():
            raise ValueError(f"--init-from {source} holds a different model; pass its config "
                             f"(--config {Path(source) / ckpt.CONFIG_FILE})")
        self.core.load_state_dict(initial.state_dict())

    # ---- resume ----------------------------------------------------------------------------------------

    def resume(self, candidates: list[Path]) -> None:
        """Continue from the newest usable checkpoint: weights, optimizer, schedule, data position, RNG."""
        if S.is_sharded_checkpoint(candidates[0]):  # every rank reads its shards (train/sharded.py)
            path = candidates[0]
            small = S.load_sharded_checkpoint(path, self.model_config, self.core, self.optimizer, self.env)
        else:
            path, small, big = load_resume_state(candidates, self.model_config, self.env, self.say)
            D.load_full_state(self.core, self.optimizer, big.get("model", {}), big.get("optimizer", {}) or {},
                              self.env)
            del big
        self.check_resumed_data(small)  # before the sampler, whose own check cannot say what changed
        restore_schedule(self.scheduler, small["scheduler"], self.tc)
        if self.scaler is not None and small.get("scaler"):
            self.scaler.load_state_dict(small["scaler"])
        self.sampler.load_state_dict(small["sampler"])
        rng = small.get("rng") or []
        if len(rng) == self.env.world_size:
            ckpt.restore_rng_state(rng[self.env.rank])
        self.step = self.saved_step = int(small["step"])
        self.result.restore_history(small.get("history") or {})
        self.result.checkpoint = str(path)
        self.say(f"resuming from {path} (step {self.step})")
        self.warn_changed_settings(small)

    def check_resumed_data(self, saved: dict[str, Any]) -> None:
        """Refuse to continue on data other than the run started on (checkpoints older than the
        fingerprint carry none and are not checked)."""
        if "data_fingerprint" in saved:
            problem = fingerprint_mismatch(saved["data_fingerprint"], self.data_fingerprint)
            if problem:
                raise ValueError(problem)

    def warn_changed_settings(self, saved: dict[str, Any]) -> None:
        saved_tc = saved.get("train_config", {})
        changed = [f"{k} {saved_tc.get(k)!r} -> {v!r}" for k, v in self.tc.to_dict().items()
                   if k in RECIPE_FIELDS and k in saved_tc and saved_tc[k] != v]
        if saved.get("world_size", self.env.world_size) != self.env.world_size:
            changed.append(f"world_size {saved.get('world_size')} -> {self.env.world_size}")
        if changed:
            self.say("warning: the run continues with changed settings: " + ", ".join(changed))

    def open_run_dir(self) -> None:
        """Rank 0: clear temporaries of killed writes, write the run files, open the logs and progress."""
        self.elapsed_before = self.result.elapsed_seconds
        if self.env.is_main:
            removed = remove_stale_temporaries(self.out, self.out / ckpt.CHECKPOINT_DIR)
            removed += S.remove_partial_checkpoints(self.out)  # sharded saves that were killed
            if removed:
                self.say(f"removed {len(removed)} temporary file(s) of an interrupted write: "
                         + ", ".join(p.name for p in removed))
            ckpt.write_run_files(self.out, self.model_config, self.tc.to_json(), self.data.path,
                                 {"world_size": self.env.world_size, "fsdp": self.sharded,
                                  "precision": self.precision, "device": str(self.device)})
            self.log = MetricsLog(self.out, start_step=self.step, tensorboard=self.tc.tensorboard,
                                  wandb_project=self.tc.wandb, say=self.say,
                                  run_config={"model": self.model_config.to_dict(), "train": self.tc.to_dict()})
        self.bar = Progress(self.tc.max_steps, "train", unit="steps", initial=self.step, enabled=self.show_progress)
        if self.step == 0:
            self.say(f"training {self.model_config.architecture} ({self.core.num_parameters() / 1e6:.2f}M "
                     f"parameters) on {self.device} x {self.env.world_size}{' (FSDP2)' if self.sharded else ''}, "
                     f"{self.precision}: {self.tc.max_steps} steps of {self.tokens_per_step} tokens, "
                     f"peak lr {self.tc.lr:g}")

    # ---- step ------------------------------------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step over grad_accum micro-batches (losses stay on the device until logged)."""
        tc, model, scaler = self.tc, self.train_model, self.scaler
        loss_sum = torch.zeros((), device=self.device)
        with GradNormTally() as tally:  # table-gradient norms summed by the backward kernels
            for micro in range(tc.grad_accum):
                x, y = self.sampler.next_batch(self.device)
                with D.gradient_sync(model, micro == tc.grad_accum - 1):
                    with autocast(self.device, self.precision):
                        logits, loss = model(x, y)
                        if self.teacher is not None:
                            loss = distillation_loss(logits, teacher_logits(self.teacher, x), y,
                                                     alpha=tc.distill_alpha, temperature=tc.distill_temperature)
                    scaled = loss / tc.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach().float()
        clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        lr_used = self.optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.unscale_(self.optimizer)
            norm = D.grad_norm_value(clip_gradients(self.params, clip, sharded=self.sharded))
            scaler.step(self.optimizer)
            scaler.update()
        else:
            norm = D.grad_norm_value(clip_and_step(self.optimizer, self.params, clip, sharded=self.sharded,
                                                   tally=tally))
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.result.tokens += self.tokens_per_step
        self.stats.add(loss_sum / tc.grad_accum, lr_used, norm)
        self.bar.update(1, tokens=self.tokens_per_step)

    def log_interval(self) -> None:
        """Reduce the pending steps' losses (one sync per log interval), check them, log them."""
        interval = self.stats.flush(len(self.result.losses) + 1, self.env)
        if interval is None:
            return
        bad = [(interval.first_step + i, v) for i, v in enumerate(interval.losses) if not math.isfinite(v)]
        if bad and self.precision != "fp16":
            step, value = bad[0]
            last = f"the last checkpoint is {self.result.checkpoint}" if self.result.checkpoint else "no checkpoint"
            raise FloatingPointError(f"the training loss became {value} at step {step} (lr "
                                     f"{interval.lrs[step - interval.first_step]:.3g}); lower the peak learning "
                                     f"rate (--lr, now {self.tc.lr:g}); {last}")
        r = self.result
        r.losses += interval.losses
        r.lrs += interval.lrs
        r.grad_norms += interval.grad_norms
        r.train_seconds += interval.seconds
        self.bar.update(0, loss=interval.losses[-1])
        if self.log is None:
            return
        tps, step = interval.tokens_per_s, interval.last_step
        self.log.row(step=step, tokens=r.tokens, loss=f"{sum(interval.losses) / len(interval.losses):.6f}",
                     lr=f"{interval.lrs[-1]:.6g}", grad_norm=f"{interval.grad_norms[-1]:.4f}",
                     tokens_per_s=f"{tps:.1f}", model_flops_per_s=f"{tps * self.fpt:.4g}",
                     elapsed_s=f"{self.elapsed():.1f}")
        for i, (loss, lr, norm) in enumerate(zip(interval.losses, interval.lrs, interval.grad_norms)):
            self.log.scalars(interval.first_step + i, {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm})
        self.log.scalars(step, {"perf/tokens_per_s": tps, "perf/model_flops_per_s": tps * self.fpt})

    # ---- evaluate --------------------------------------------------------------------------------------

    def evaluate(self) -> None:
        """Validation loss (and the on_eval numbers) at this step, stored and logged."""
        tc, env = self.tc, self.env
        global_batch = tc.batch_size * tc.grad_accum * env.world_size
        max_windows = tc.eval_batches * global_batch if tc.eval_batches else None
        res = validation_loss(self.fast, self.data, tc.seq_len, tc.batch_size, max_windows=max_windows, env=env,
                              precision=self.precision, sharded=self.sharded)
        extra = self.on_eval_numbers()
        self.result.evals.append({"step": self.step, "tokens": self.result.tokens, "val_loss": res["loss"],
                                  "val_ppl": res["ppl"], **extra})
        if self.log is not None:
            self.log.row(step=self.step, tokens=self.result.tokens, val_loss=f"{res['loss']:.6f}",
                         val_ppl=f"{res['ppl']:.4f}", elapsed_s=f"{self.elapsed():.1f}",
                         **{k: f"{v:.6g}" for k, v in extra.items()})
            self.log.scalars(self.step, {"val/loss": res["loss"], "val/ppl": res["ppl"],
                                         **{f"val/{k}": v for k, v in extra.items()}})
        self.say(f"step {self.step}: val loss {res['loss']:.4f}, ppl {res['ppl']:.2f}")

    def on_eval_numbers(self) -> dict[str, float]:
        if self.on_eval is None:
            return {}
        was_training = self.core.training
        self.core.eval()
        with torch.no_grad():
            extra = {k: float(v) for k, v in self.on_eval(self.core, self.step).items()}
        self.core.train(was_training)
        return extra

    # ---- save ------------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write this step's checkpoint (atomically; signals wait until it is complete), prune old ones."""
        with self.signals.held():
            if self.sharded:  # one shard per rank, nothing gathered on rank 0 (train/sharded.py)
                path = S.save_sharded_checkpoint(self.out, self.step, self.core, self.optimizer,
                                                 self.train_state(), self.env)
            else:
                path = ckpt.checkpoint_path(self.out, self.step)
                state = self.checkpoint_state()
                if self.env.is_main:
                    ckpt.save_checkpoint(path, state)
                del state
            if self.env.is_main:
                ckpt.prune_checkpoints(self.out, self.tc.keep_last)
        self.result.checkpoint = str(path)
        self.saved_step = self.step
        self.last_save = time.monotonic()
        return path

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs, gathered to rank 0 (a collective: every rank calls it)."""
        model_state = D.full_model_state(self.core)
        optim_state = D.full_optimizer_state(self.core, self.optimizer)
        return {**self.train_state(), "model": model_state, "optimizer": optim_state}

    def train_state(self) -> dict[str, Any]:
        """A checkpoint's state but the model and optimizer (gathers RNG states: every rank calls it)."""
        rng = D.gather_objects(ckpt.capture_rng_state(), self.env)
        r = self.result
        r.elapsed_seconds = self.elapsed()
        if self.stats.steady_seconds > 0:
            r.tokens_per_s = self.stats.steady_tokens_per_s
        return {"step": self.step, "data_fingerprint": self.data_fingerprint,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "sampler": self.sampler.state_dict(), "rng": rng, "model_config": self.model_config.to_dict(),
                "train_config": self.tc.to_dict(), "history": r.history(), "world_size": self.env.world_size,
                "torch_version": str(torch.__version__)}

    # ---- finish ----------------------------------------------------------------------------------------

    def abandon(self) -> None:
        """A second Ctrl-C outside a write: stop without a checkpoint; the last one stays as it was."""
        self.abandoned = True
        self.result.interrupted = "SIGINT"
        last = f"the last checkpoint is {self.result.checkpoint}" if self.result.checkpoint else "no checkpoint yet"
        self.say(f"stopped at once by a second SIGINT at step {self.step}, without a new checkpoint; {last}; "
                 f"{self.resume_hint}")

    def close_logs(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()

    def finish(self) -> TrainResult:
        """Final throughput and weights (when max_steps was reached), history.json; the result."""
        r, stats = self.result, self.stats
        if stats.steady_seconds > 0:
            r.tokens_per_s = stats.steady_tokens_per_s
        elif r.tokens_per_s == 0 and r.train_seconds > 0:  # one step only, or nothing left to train
            r.tokens_per_s = r.tokens / r.train_seconds
        r.model_flops_per_s = r.tokens_per_s * self.fpt
        r.step = self.step
        r.finished = self.step >= self.tc.max_steps and not self.abandoned
        r.elapsed_seconds = self.elapsed()
        with self.signals.held():
            if r.finished:
                self.write_weights()
            if self.env.is_main:
                ckpt.atomic_write_text(self.out / "history.json", json.dumps(r.to_dict(), indent=1) + "\n")
        if self.env.is_main and r.evals and r.finished:
            self.say(f"done: {self.step} steps, val loss {r.val_loss:.4f}, ppl {r.val_ppl:.2f}, "
                     f"{r.tokens_per_s:,.0f} tokens/s; weights in {r.weights}")
        r.model = self.core
        return r

    def write_weights(self) -> None:
        state = D.full_model_state(self.core)
        if self.env.is_main:
            path = ckpt.save_model_weights(state, self.out / ckpt.WEIGHTS_FILE, self.model_config, step=self.step)
            self.result.weights = str(path)


# ---------------------------------------------------------------------------------------------------------
# Before the loop: inputs, the run directory's lock, which checkpoint to resume
# ---------------------------------------------------------------------------------------------------------


def check_inputs(model_config: ModelConfig, seq_len: int, data) -> None:
    """Errors for a sequence longer than the model's or a data vocabulary larger than the model's."""
    if seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_seq_len {model_config.max_seq_len}; "
                         f"use --seq-len {model_config.max_seq_len} or less")
    if data.vocab_size > model_config.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size} ids, {data.path}/meta.json) is larger than "
                         f"the model's vocab_size {model_config.vocab_size}; use a model with vocab_size >= "
                         f"{data.vocab_size} (e.g. --vocab-size {data.vocab_size}) or prepare the data with "
                         f"--vocab-size {model_config.vocab_size} or less")
    for split in ("train", "val"):
        data.check_seq_len(split, seq_len)


def check_out_dir(out: Path) -> None:
    """Error unless `out` is a directory or can become one."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out}: {folder} is a file, not a directory; give --out a new "
                                 "directory or an existing run's")
            return


def load_teacher(source: str, student: ModelConfig, device: torch.device) -> nn.Module:
    """A frozen teacher in eval mode on `device`, with the student's vocabulary."""
    teacher, _ = ckpt.load_model(source, device)
    if teacher.config.vocab_size != student.vocab_size:
        raise ValueError(f"--teacher {source} has a vocabulary of {teacher.config.vocab_size}, the student "
                         f"{student.vocab_size}: distillation needs the same tokenizer")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def resume_candidates(out: Path, resume: bool | str) -> list[Path] | None:
    """The checkpoints to resume from, newest first (None: a fresh run)."""
    found = [path for _, path in reversed(ckpt.list_checkpoints(out))]
    if resume == "auto":
        return found or None
    if resume:
        if not found:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {out / ckpt.CHECKPOINT_DIR}; start the "
                                    "run without --resume")
        return found
    if found:
        raise ValueError(f"{out} already holds checkpoints (latest {found[0].name}); pass --resume to continue "
                         "that run, or choose another --out")
    return None


def load_resume_state(candidates: list[Path], model_config: ModelConfig, env: D.DistEnv,
                      say: Callable[[str], None]) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(the checkpoint used, its small state on every rank, {"model", "optimizer"} on rank 0).

    Rank 0 takes the newest readable checkpoint, saying which damaged ones it passed over; errors
    reach every rank."""
    small: dict[str, Any] = {}
    big: dict[str, Any] = {}
    if env.is_main:
        try:
            path, state = ckpt.load_newest_valid(candidates, say, need=ckpt.RESUME_KEYS)
            ckpt.check_same_model(path, state, model_config)
            small = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            small["path"] = str(path)
            big = {"model": state["model"], "optimizer": state.get("optimizer")}
        except (ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
            small = {"error": str(err)}
    small = D.broadcast_object(small, env)
    if "error" in small:
        raise ckpt.CheckpointError(small["error"])
    return Path(small.pop("path")), small, big


def lock_run_dir(out: Path, lock: RunLock) -> None:
    """Create the run directory and take its lock (a second process training into it is refused)."""
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()


def on_main(env: D.DistEnv, work: Callable[[], Any]) -> Any:
    """work() on rank 0, its result (or its error, raised) on every rank."""
    outcome: dict[str, Any] = {}
    if env.is_main:
        try:
            outcome = {"value": work()}
        except (OSError, ValueError, RuntimeError) as err:
            outcome = {"error": err}
    outcome = D.broadcast_object(outcome, env)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def train(model_config: ModelConfig, train_config: TrainConfig, data_dir: str | Path, out_dir: str | Path,
          resume: bool | str = False, *, stop_at_step: int | None = None, progress: bool = True,
          verbose: bool = True, on_eval: OnEval | None = None,
          resume_hint: str = "continue with --resume") -> TrainResult:
    """Train a LanguageModel on a prepared data directory; write logs, checkpoints and weights to out_dir.

    resume: False starts a new run (error if out_dir already holds checkpoints); True continues
        from the newest readable checkpoint in out_dir (error if there is none); "auto" does whichever applies.
    stop_at_step: checkpoint and return after this step, keeping the schedule of max_steps (train
        in pieces; continue with resume=True). Weights are written only when max_steps is reached.
    on_eval: called as on_eval(model, step) after each validation (model in eval mode, no grad);
        the numbers it returns are stored in that step's `evals` entry and logged beside val_loss
        (metrics.csv columns, TensorBoard "val/<name>"). Under torchrun it runs on every rank.
    Under torchrun, every rank calls train(); rank 0 logs, writes and holds out_dir/.lock (a second
    process training into out_dir is refused). Returns a TrainResult on every rank (loss history,
    validation results, throughput; `.model` is the trained model).
    SIGINT / SIGTERM: the current step finishes, a checkpoint is written and the result comes
    back with `interrupted` set to the signal's name; the stop line ends with `resume_hint`.
    """
    from memoryformer.core.model import LanguageModel
    from memoryformer.data import TokenData

    out = Path(out_dir)
    check_out_dir(out)
    data = TokenData(data_dir)
    seq_len = train_config.seq_len or model_config.max_seq_len
    check_inputs(model_config, seq_len, data)
    tc = train_config.replace(seq_len=seq_len, lr=train_config.lr if train_config.lr is not None
                              else paper_lr(model_config))
    env = D.init_distributed(tc.device)
    lock = RunLock(out)
    on_main(env, lambda: lock_run_dir(out, lock))
    try:
        candidates = on_main(env, lambda: resume_candidates(out, resume))
        trainer = Trainer(model_config, tc, data, out, env, make_model=lambda: LanguageModel(model_config),
                          on_eval=on_eval, progress=progress, verbose=verbose, resume_hint=resume_hint)
        result = trainer.run(candidates, stop_at_step)
        D.barrier(env)  # rank 0's files are complete when any rank returns
    finally:
        lock.release()
    return result
