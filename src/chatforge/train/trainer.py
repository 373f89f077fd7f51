"""The one training loop, for every objective.

    trainer = Trainer(model, CausalLM("run/data", block_size=64), TrainConfig(out_dir="run"), tokenizer=tok)
    result = trainer.fit()   # {"step", "train_loss", "val_loss", "best_val_loss", "stopped_early", ...}

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences, summed over
all processes. Every `eval_interval` steps the validation loss is measured, `best` is
saved when `metric` (the validation loss unless the config names another) improved,
training stops after `patience` evaluations without improvement, and with `restore_best`
the model ends with the best evaluation's weights. `last` holds everything needed to continue exactly: weights, optimizer,
step, random-number generators and the data position (the batch generator's state).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, ContextManager, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from chatforge.formats.checkpoint import WEIGHTS, read_weights, save_checkpoint
from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError, CheckpointError, ConfigError
from chatforge.tokenizer import Tokenizer
from chatforge.utils import atomic_write_text, pick_precision, return_large_frees
from chatforge.train.distributed import Dist, setup_distributed
from chatforge.train.metrics import MetricsLog, plot_losses
from chatforge.train.objectives import Objective, validation_sums
from chatforge.train.schedule import lr_at

EVAL_SEED_OFFSET = 1  # validation batches come from their own generator, the same ones every time


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, never on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2), fused=fused)


# --- random-number generator state -------------------------------------------------------

def rng_state() -> dict[str, Any]:
    np_kind, np_key, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_kind, np_key.astype(np.int64), np_pos, np_gauss, np_cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- the loop -------------------------------------------------------------------------------

class Trainer:
    """Trains `model` on `objective` as `config` says; `state` (a `last` checkpoint's) resumes exactly."""

    def __init__(self, model: torch.nn.Module, objective: Objective, config: TrainConfig, *,
                 tokenizer: Optional[Tokenizer] = None, dist: Optional[Dist] = None,
                 state: Optional[dict[str, Any]] = None, title: str = ""):
        self.config, self.objective, self.tokenizer, self.title = config, objective, tokenizer, title
        self.dist = dist or setup_distributed(config.device)
        world = self.dist.world_size
        if config.grad_accum % world:
            raise ConfigError(f"grad_accum ({config.grad_accum}) counts micro-batches over all {world} processes "
                              f"and must be a multiple of {world}; use e.g. --grad-accum {world * max(1, config.grad_accum // world)}")
        if config.eval_iters < world:
            raise ConfigError(f"eval_iters ({config.eval_iters}) must be at least the number of processes ({world})")
        self.accum = config.grad_accum // world  # micro-batches per process
        self.device = self.dist.device
        self.precision = pick_precision(config.precision, self.device)
        self.out_dir = Path(config.out_dir)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")

        return_large_frees()  # resident memory follows the live tensors (what train.memory estimates)
        self.model = model.to(self.device).train()  # the plain module: what is saved and evaluated
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.step, self.best_val_loss, self.bad_evals = 0, math.inf, 0
        self.best_score, self.best_step = (math.inf if config.metric_mode == "min" else -math.inf), 0
        self.elapsed_before, self.tokens_seen = 0.0, 0
        self.train_loss: Optional[float] = None
        self.last_eval: dict[str, float] = {}
        self.loss_window = [0.0, 0]  # sum and count of step losses since the last log line
        if state is not None:
            try:
                self.load_state(state)
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                raise CheckpointError(f"the trainer state in {self.out_dir / 'last'} is corrupt ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:120] if str(e) else ''}); it cannot be resumed, start "
                                      "a new run (or --init-from its weights)") from None
        else:
            seed_everything(config.seed + self.dist.rank)  # dropout differs across processes

        forward = torch.compile(self.model) if config.compile else self.model
        self.forward_model = forward  # no gradient sync: evaluation
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DDP(forward, device_ids=ids)
        self.train_model = forward

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything `last` needs for an exact continuation (collective: call on every process)."""
        return {
            "step": self.step, "best_val_loss": _finite_or_none(self.best_val_loss), "bad_evals": self.bad_evals,
            "best_score": _finite_or_none(self.best_score), "best_step": self.best_step,
            "elapsed_s": self.elapsed, "tokens_seen": self.tokens_seen, "train_loss": self.train_loss,
            "last_eval": self.last_eval, "loss_window": list(self.loss_window),
            "optimizer": self.optimizer.state_dict(), "data_generator": self.data_gen.get_state(),
            "objective": self.objective.state_dict(), "rng": self.dist.all_gather(rng_state()),
            "world_size": self.dist.world_size, "config": self.config.to_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        best = state.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        self.bad_evals = int(state.get("bad_evals", 0))
        if state.get("best_score") is not None:
            self.best_score = float(state["best_score"])
        elif self.config.metric == "val_loss":  # saved before `metric` existed
            self.best_score = self.best_val_loss
        self.best_step = int(state.get("best_step", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_loss = state.get("train_loss")
        self.last_eval = dict(state.get("last_eval") or {})
        self.loss_window = list(state.get("loss_window", [0.0, 0]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.data_gen.set_state(state["data_generator"])
        self.objective.load_state_dict(state.get("objective", {}))
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    # --- one step ----------------------------------------------------------------------------
    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step; returns (mean loss of this process, gradient norm, tokens of all processes)."""
        cfg, rank = self.config, self.dist.rank
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the same global batch on every process; each takes its own `accum` micro-batches
        items = self.objective.sample("train", cfg.batch_size * cfg.grad_accum, self.data_gen)
        mine = items[rank * self.accum * cfg.batch_size:(rank + 1) * self.accum * cfg.batch_size]
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(self.accum):
            batch = self.objective.collate("train", mine[micro * cfg.batch_size:(micro + 1) * cfg.batch_size])
            tokens += self.objective.tokens(batch)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            last_micro = micro == self.accum - 1
            sync = contextlib.nullcontext() if last_micro or not self.dist.enabled else self.train_model.no_sync()
            with sync:
                with self.autocast():
                    loss = self.objective.loss(self.train_model, batch) / self.accum
                loss.backward()
            total += loss.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total, grad_norm, tokens * self.dist.world_size

    def evaluate(self) -> dict[str, float]:
        """Validation metrics on `eval_iters` fixed batches (or the objective's own pass over
        its whole validation set), shared out among the processes."""
        cfg = self.config
        iters = self.objective.eval_batches(cfg.batch_size) or cfg.eval_iters
        sums = validation_sums(self.forward_model, self.objective, iters, cfg.batch_size, self.device,
                               cfg.seed + EVAL_SEED_OFFSET, dist=self.dist, autocast=self.autocast)
        return self.objective.summarize(sums, iters)

    def _improved(self, results: dict[str, float]) -> bool:
        if self.config.metric not in results:
            raise ConfigError(f"metric {self.config.metric!r} is not among the evaluation results "
                              f"({', '.join(results)}); choose one of those")
        score = results[self.config.metric]
        return score < self.best_score if self.config.metric_mode == "min" else score > self.best_score

    def restore(self, name: str = "best") -> None:
        """Load the weights of out_dir/`name` into the model (every process reads the same file)."""
        state = read_weights(self.out_dir / name / WEIGHTS, device=self.device)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ChatforgeError(f"{self.out_dir / name} does not hold this model's weights")

    # --- files ---------------------------------------------------------------------------------
    def save(self, name: str, with_state: bool) -> None:
        state = self.state_dict() if with_state else None  # collective, so before the rank check
        if self.dist.is_main:
            info = {"step": self.step, "val_loss": self.last_eval.get("val_loss"), "train_loss": self.train_loss}
            save_checkpoint(self.out_dir / name, self.model, self.tokenizer, trainer_state=state,
                            extra_json={"training.json": info})

    def _plot(self) -> None:
        if self.dist.is_main:
            metric = self.config.metric if self.config.metric != "val_loss" else None
            plot_losses(self.metrics.path, self.out_dir / "loss.png", self.title, metric=metric)

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, main = self.config, self.dist.is_main
        save_every = cfg.save_interval or cfg.eval_interval
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            if self.step:  # resumed: records past the checkpoint are written again
                self.metrics.truncate_after(self.step)
            else:
                self.metrics.path.unlink(missing_ok=True)
        self._t0 = time.perf_counter()
        stopped = False
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", desc=self.title or "training",
                   disable=not (cfg.progress and main), dynamic_ncols=True)
        window_tokens, window_t0 = 0, time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        try:
            while self.step < cfg.max_steps and not stopped:
                loss, grad_norm, tokens = self.train_step()
                loss_sum += loss
                self.loss_window[1] += 1
                window_tokens += tokens
                self.tokens_seen += tokens
                bar.update(1)
                record: dict[str, Any] = {}
                last_step = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or last_step or self.step % cfg.eval_interval == 0:
                    now = time.perf_counter()
                    self.loss_window[0] += float(loss_sum)
                    loss_sum.zero_()
                    total, count = self.dist.all_reduce_sum(self.loss_window)
                    self.train_loss = total / max(1.0, count)
                    self.loss_window = [0.0, 0]
                    if not math.isfinite(self.train_loss):
                        raise ChatforgeError(f"training diverged: the loss is {self.train_loss} at step {self.step}; "
                                             "lower --lr or raise --warmup-steps")
                    record = {"step": self.step, "train_loss": self.train_loss, "lr": lr_at(self.step - 1, cfg),
                              "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(now - window_t0, 1e-9),
                              "tokens": self.tokens_seen}
                    window_tokens, window_t0 = 0, now
                    bar.set_postfix(loss=f"{self.train_loss:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                    if not cfg.progress and main:
                        print(f"step {self.step}/{cfg.max_steps} | loss {self.train_loss:.4f} | lr {record['lr']:.2e} "
                              f"| {record['tokens_per_s']:.0f} tok/s", flush=True)
                paused = time.perf_counter()  # evaluation and saving do not count against tokens/s
                if self.step % cfg.eval_interval == 0 or last_step:
                    self.last_eval = self.evaluate()
                    record.update(self.last_eval)
                    improved = self._improved(self.last_eval)
                    self.best_val_loss = min(self.best_val_loss, self.last_eval["val_loss"])
                    if improved:
                        self.best_score, self.best_step, self.bad_evals = self.last_eval[cfg.metric], self.step, 0
                        self.save("best", with_state=False)
                    else:
                        self.bad_evals += 1
                        stopped = cfg.patience > 0 and self.bad_evals >= cfg.patience
                    if main:
                        extra = "".join(f" | {k} {v:.4f}" for k, v in self.last_eval.items() if k != "val_loss")
                        note = " (best)" if improved else (" (early stop)" if stopped else "")
                        (bar.write if cfg.progress else print)(
                            f"step {self.step}: train loss {self.train_loss:.4f} | val loss "
                            f"{self.last_eval['val_loss']:.4f}{extra}{note}")
                if record and main:
                    record["elapsed_s"] = round(self.elapsed, 3)
                    self.metrics.append(record)
                if self.step % save_every == 0 or last_step or stopped:
                    # the window already counts any steps since the last log line
                    self.loss_window[0] += float(loss_sum)
                    loss_sum.zero_()
                    self.save("last", with_state=True)
                    self._plot()
                window_t0 += time.perf_counter() - paused
        finally:
            bar.close()
        self._plot()
        self.dist.barrier()  # every file is written before anyone returns
        if cfg.restore_best and self.best_step:
            self.restore("best")
        return {
            "step": self.step, "train_loss": self.train_loss, "val_loss": self.last_eval.get("val_loss"),
            "best_val_loss": _finite_or_none(self.best_val_loss), "stopped_early": stopped,
            "best_metric": _finite_or_none(self.best_score), "best_step": self.best_step,
            "elapsed_s": self.elapsed, "out_dir": str(self.out_dir), **{k: v for k, v in self.last_eval.items()
                                                                         if k != "val_loss"},
        }


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None
