"""B1 training: chatforge's Trainer against transformers' GPT2LMHeadModel.

Speed (`B1`): tokens/s of optimizer steps on character-level Tiny Shakespeare, the same shape,
batch, data (the same random blocks), optimizer (AdamW, fused, decay on matrices only, grad
clipping) and precision (fp32, or bf16 autocast) on both sides. chatforge runs its real
Trainer.train_step; the peer runs the same steps in a plain loop. Two chatforge layouts are
timed: GPT-2's own (the same arithmetic as the peer, so only the implementation differs) and
the recipe's (rotary positions, SwiGLU, RMSNorm, no biases) at the same size.

Convergence (`B1-converge`): wall time until the validation loss reaches 1.88 for nanoGPT's CPU
recipe (4 layers, 4 heads, width 128, block 64, batch 12, lr 1e-3 -> 1e-4, 2,000 iterations, fp32)
run with GPT2LMHeadModel, against chatforge's recipe (recipes/shakespeare_char.sh). nanoGPT's split:
the first 90% of the file trains, the rest validates. Both are evaluated every `eval_every`
steps on the same fixed validation batches; evaluation time is not counted. The two runs advance
in alternating slices of steps, so load from other processes lands on both alike.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from chatforge.config import ModelConfig, TrainConfig
from chatforge.model import Transformer
from chatforge.train.objectives import CausalLM, lm_loss
from chatforge.train.schedule import lr_at
from chatforge.train.trainer import Trainer, make_optimizer

from .common import SHAKESPEARE, hf_peer, interleaved, median, spread

TARGET_LOSS = 1.88
GPT2_LAYOUT = dict(pos_encoding="learned", mlp="gelu_tanh", norm="layernorm", bias=True)
RECIPE_LAYOUT = dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False)
NANO = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)


# --- data ---------------------------------------------------------------------------------------

def prepare_data(root: Path, quick: bool) -> tuple[Path, int]:
    """Char-level shards of Tiny Shakespeare (nanoGPT's 90/10 split) under root; returns (dir, padded vocab)."""
    from chatforge.data.shards import iter_train_text, prepare_shards
    from chatforge.tokenizer import train_tokenizer
    from chatforge.train.frame import VOCAB_MULTIPLE

    source = SHAKESPEARE
    if quick or not source.is_file():  # a small slice (or, without the file, made-up text)
        text = source.read_text()[:200_000] if source.is_file() else _made_up_text()
        source = root / "text.txt"
        source.write_text(text)
    tok = train_tokenizer("char", iter_train_text([source], 0.1), None, show_progress=False)
    prepare_shards([source], tok, root / "data", val_fraction=0.1, progress=False)
    return root / "data", -(-tok.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _made_up_text() -> str:
    g = torch.Generator().manual_seed(0)
    words = ["the", "king", "shall", "not", "be", "so", "my", "lord", "and", "what", "is", "love", "of"]
    idx = torch.randint(0, len(words), (40_000,), generator=g).tolist()
    return "\n".join(" ".join(words[i] for i in idx[j:j + 10]) for j in range(0, len(idx), 10))


# --- one training step each way -----------------------------------------------------------------

class PeerTrainer:
    """The peer's loop: the steps Trainer.train_step takes, written plainly for a transformers model."""

    def __init__(self, model, objective: CausalLM, config: TrainConfig, precision: str):
        self.model, self.objective, self.config = model.train(), objective, config
        self.optimizer = make_optimizer(model, config, torch.device("cpu"))
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.bf16 = precision == "bf16"
        self.step = 0

    def train_step(self) -> torch.Tensor:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        batch = self.objective.collate("train", self.objective.sample("train", cfg.batch_size, self.data_gen))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = lm_loss(self.model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()


def chatforge_trainer(model: Transformer, data_dir: Path, config: TrainConfig) -> Trainer:
    return Trainer(model, CausalLM(data_dir, model.config.block_size), config)


def _train_config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out), device="cpu", progress=False, **kw)


# --- B1: tokens/s ---------------------------------------------------------------------------------

def speed(data_dir: Path, vocab: int, quick: bool = False, rounds: int = 3) -> dict:
    """Tokens/s of chatforge (two layouts) and GPT2LMHeadModel, fp32 and bf16, at each shape."""
    shapes = {"nano (4x128, block 64, batch 12)": (NANO, 12)}
    if quick:
        shapes = {"toy (2x32, block 32, batch 4)": (dict(n_layer=2, n_head=2, n_embd=32, block_size=32), 4)}
    else:
        shapes["small (6x384, block 128, batch 8)"] = (dict(n_layer=6, n_head=6, n_embd=384, block_size=128), 8)
    steps = 2 if quick else 8
    rounds = 1 if quick else rounds
    out: dict = {"shapes": {}, "steps_per_timing": steps, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (dims, batch) in shapes.items():
            objective = CausalLM(data_dir, dims["block_size"])
            runs: dict[str, Callable[[], object]] = {}
            for precision in ("fp32", "bf16"):
                cfg = _train_config(Path(tmp), batch_size=batch, precision=precision, max_steps=10**6,
                                    warmup_steps=0, lr=1e-3)
                torch.manual_seed(0)
                gpt2 = Transformer(ModelConfig(vocab_size=vocab, **dims, **GPT2_LAYOUT))
                peer = PeerTrainer(hf_peer(gpt2), objective, cfg, precision)
                torch.manual_seed(0)
                recipe = Transformer(ModelConfig(vocab_size=vocab, **dims, **RECIPE_LAYOUT))
                for name, trainer in ((f"chatforge gpt2-layout {precision}", chatforge_trainer(gpt2, data_dir, cfg)),
                                      (f"transformers GPT2LMHeadModel {precision}", peer),
                                      (f"chatforge recipe-layout {precision}", chatforge_trainer(recipe, data_dir, cfg))):
                    trainer.train_step()  # warm-up: allocations, kernel choice
                    runs[name] = _steps(trainer, steps)
            times = interleaved(runs, rounds)
            tokens = steps * batch * dims["block_size"]
            rows = {n: {"tokens_per_s": tokens / median(t), "spread": spread(t)} for n, t in times.items()}
            out["shapes"][label] = {"rows": rows, "ratios": _speed_ratios(rows)}
    first = next(iter(out["shapes"].values()))
    out["ratios"] = first["ratios"]
    return out


def _steps(trainer, n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            trainer.train_step()
    return run


def _speed_ratios(rows: dict) -> dict:
    def tps(name: str) -> float:
        return rows[name]["tokens_per_s"]

    best_peer = max(tps(f"transformers GPT2LMHeadModel {p}") for p in ("fp32", "bf16"))
    best_cf = max(r["tokens_per_s"] for n, r in rows.items() if n.startswith("chatforge"))
    return {
        "gpt2-layout fp32": tps("chatforge gpt2-layout fp32") / tps("transformers GPT2LMHeadModel fp32"),
        "gpt2-layout bf16": tps("chatforge gpt2-layout bf16") / tps("transformers GPT2LMHeadModel bf16"),
        "gpt2-layout best/best": max(tps("chatforge gpt2-layout fp32"), tps("chatforge gpt2-layout bf16")) / best_peer,
        "fastest/fastest": best_cf / best_peer,
    }


# --- B1-converge: wall time to validation loss 1.88 -------------------------------------------------

def nanogpt_config(out: Path, max_steps: int) -> TrainConfig:
    """nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides."""
    return _train_config(out, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=max_steps,
                         weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, precision="fp32", seed=1337)


def recipe_config(out: Path, max_steps: int, precision: str = "auto") -> TrainConfig:
    """recipes/shakespeare_char.sh: the same flags."""
    return _train_config(out, batch_size=12, lr=3e-3, min_lr=3e-4, warmup_steps=50, max_steps=max_steps,
                         schedule="cosine", weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                         precision=precision, seed=1337)


class Evaluator:
    """Mean loss on fixed validation batches (the same for both contenders), untimed."""

    def __init__(self, objective: CausalLM, batches: int, batch_size: int):
        gen = torch.Generator().manual_seed(2024)
        self.objective = objective
        self.batches = [objective.collate("val", objective.sample("val", batch_size, gen)) for _ in range(batches)]

    @torch.no_grad()
    def __call__(self, forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module) -> float:
        model.eval()
        total = sum(float(lm_loss(forward(b["input_ids"]), b["labels"])) for b in self.batches)
        model.train()
        return total / len(self.batches)


def converge(data_dir: Path, vocab: int, quick: bool = False, eval_every: int = 50, eval_batches: int = 50,
             target: float = TARGET_LOSS, recipe_precision: str = "auto") -> dict:
    """Wall time (training only) for each recipe to first reach `target` validation loss."""
    nano_steps, recipe_steps = (40, 20) if quick else (2000, 750)
    eval_every = 10 if quick else eval_every
    eval_batches = 4 if quick else eval_batches
    if quick:
        target = 99.0  # a toy run proves the plumbing, not the loss
    objective = CausalLM(data_dir, NANO["block_size"])
    evaluate = Evaluator(objective, eval_batches, 12)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(1337)
        gpt2 = Transformer(ModelConfig(vocab_size=vocab, dropout=0.0, **NANO, **GPT2_LAYOUT))
        peer_model = hf_peer(gpt2)  # chatforge's init is nanoGPT's: N(0, 0.02), projections scaled by depth
        peer = PeerTrainer(peer_model, objective, nanogpt_config(Path(tmp) / "nano", nano_steps), "fp32")
        torch.manual_seed(1337)
        ours = Transformer(ModelConfig(vocab_size=vocab, dropout=0.0, **NANO, **RECIPE_LAYOUT))
        trainer = chatforge_trainer(ours, data_dir, recipe_config(Path(tmp) / "recipe", recipe_steps,
                                                                   recipe_precision))
        runs = {
            "nanoGPT recipe, transformers GPT2LMHeadModel": _Run(
                peer, nano_steps, target, lambda: evaluate(lambda x: peer_model(input_ids=x).logits, peer_model)),
            "chatforge recipe (shakespeare_char.sh)": _Run(trainer, recipe_steps, target, lambda: evaluate(ours, ours)),
        }
        while any(not r.finished for r in runs.values()):
            for run in runs.values():
                if not run.finished:
                    run.advance(eval_every)
    rows = {name: run.summary() for name, run in runs.items()}
    peer_row, ours_row = rows.values()
    ratio, basis = None, "neither reached the target"
    if ours_row["seconds_to_target"] is not None:
        if peer_row["seconds_to_target"] is not None:
            ratio, basis = ours_row["seconds_to_target"] / peer_row["seconds_to_target"], "both reached the target"
        else:  # the peer's whole run is then a lower bound on its time to the target
            ratio = ours_row["seconds_to_target"] / peer_row["final_seconds"]
            basis = "the nanoGPT recipe did not reach the target: chatforge's time over its whole run (an upper bound)"
    return {"target_val_loss": target, "eval_every": eval_every, "eval_batches": eval_batches,
            "recipe_precision": trainer.precision, "rows": rows, "ratios": {"wall_time_fraction": ratio}, "ratio_basis": basis}


class _Run:
    """One recipe advanced in slices: training time accumulates, evaluations are off the clock."""

    def __init__(self, trainer, max_steps: int, target: float, evaluate: Callable[[], float]):
        self.trainer, self.max_steps, self.target, self.evaluate = trainer, max_steps, target, evaluate
        self.steps, self.seconds = 0, 0.0
        self.curve: list[tuple[int, float, float]] = []  # (step, train seconds, val loss)
        self.reached: Optional[tuple[int, float, float]] = None

    @property
    def finished(self) -> bool:
        return self.reached is not None or self.steps >= self.max_steps

    def advance(self, n: int) -> None:
        n = min(n, self.max_steps - self.steps)
        t0 = time.perf_counter()
        for _ in range(n):
            loss = self.trainer.train_step()
        float(loss[0] if isinstance(loss, tuple) else loss)  # wait for the last step to finish
        self.seconds += time.perf_counter() - t0
        self.steps += n
        val = self.evaluate()
        self.curve.append((self.steps, self.seconds, val))
        if not math.isfinite(val):
            raise RuntimeError(f"training diverged at step {self.steps}")
        if val <= self.target and self.reached is None:
            self.reached = self.curve[-1]

    def summary(self) -> dict:
        last = self.curve[-1]
        return {"steps_to_target": self.reached[0] if self.reached else None,
                "seconds_to_target": self.reached[1] if self.reached else None,
                "val_loss_at_target": self.reached[2] if self.reached else None,
                "final_step": last[0], "final_seconds": last[1], "final_val_loss": last[2],
                "curve": [{"step": s, "seconds": round(t, 2), "val_loss": round(v, 4)} for s, t, v in self.curve]}


@contextlib.contextmanager
def shards(quick: bool):
    """Prepared data for B1, in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        yield prepare_data(Path(tmp), quick)
