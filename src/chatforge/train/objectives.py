"""Training objectives: what the one Trainer trains.

An objective says where batches come from and how a batch becomes a loss. Drawing a
batch is two steps so that data parallelism stays exact: `sample` draws the items of
the whole global batch from the Trainer's generator (every process draws the same),
then `collate` loads only this process's slice. Pre-training is CausalLM below;
masked-LM (mlm.py), chat fine-tuning (sft.py) and classification (classify.py) are the
others: new objectives, not new loops. `validation_sums` is the one validation pass, which
the Trainer runs every `eval_interval` steps and `chatforge eval` runs on a finished model.

    sums = validation_sums(model, objective, batches=20, batch_size=16)
    metrics = objective.summarize(sums, 20)   # {"val_loss", "ppl", ...}
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from chatforge.data.shards import TokenShards
from chatforge.data.text import IGNORE_INDEX
from chatforge.train.distributed import Dist


class Objective:
    """Base class: override sample, collate and loss; evaluate/summarize for extra metrics."""

    def sample(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """n items (one row each: an offset, an example index, ...) drawn with `generator`."""
        raise NotImplementedError

    def collate(self, split: str, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs and labels for `items`, as CPU tensors."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sums for one validation batch; summarize() turns the totals into metrics."""
        return {"loss": float(self.loss(model, batch))}

    def summarize(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        val_loss = sums["loss"] / batches
        return {"val_loss": val_loss, "ppl": math.exp(min(val_loss, 50.0))}

    def eval_batches(self, batch_size: int) -> int | None:
        """Batches that make one pass over the whole validation set, for objectives that evaluate
        on all of it (a labelled data set); None = the config's eval_iters random batches."""
        return None

    def eval_items(self, index: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """The items of validation batch `index`; random ones from `generator` unless overridden."""
        return self.sample("val", n, generator)

    # step_shape(batch_size) -> (tokens of a micro-batch, positions the loss selects or None for every
    # token's logits): objectives that know it let train.memory check a step fits before the first one

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens in a batch, for the tokens/s figure."""
        return int(batch["input_ids"].numel())

    def state_dict(self) -> dict[str, Any]:
        """Data position beyond the Trainer's generator (none for random sampling)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FullValidation(Objective):
    """Mixin for objectives that evaluate one pass over their whole validation set, in order."""

    def val_size(self) -> int:
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> int:
        return max(1, math.ceil(self.val_size() / batch_size))

    def eval_items(self, index: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.arange(index * n, min((index + 1) * n, self.val_size()))


@torch.no_grad()
def validation_sums(model: torch.nn.Module, objective: Objective, batches: int, batch_size: int,
                    device: str | torch.device = "cpu", seed: int = 0, *, dist: Optional[Dist] = None,
                    autocast: Optional[Callable[[], ContextManager]] = None) -> dict[str, float]:
    """The sums of the objective's `evaluate` over validation batches 0..batches-1 (its eval_items,
    drawn from a generator seeded with `seed`), in eval mode. Under `dist` each process takes every
    world_size-th batch and the sums are added up over all processes."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for i in range(batches):
        items = objective.eval_items(i, batch_size, gen)  # drawn on every process: the same batches for all
        if i % world != rank:
            continue
        batch = {k: v.to(device) for k, v in objective.collate("val", items).items()}
        with autocast() if autocast is not None else contextlib.nullcontext():
            for key, value in objective.evaluate(model, batch).items():
                sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    if dist is not None:
        keys = sorted(sums)
        sums = dict(zip(keys, dist.all_reduce_sum([sums[k] for k in keys])))
    return sums


def run_objective(model: torch.nn.Module, objective: Objective, batches: int, batch_size: int,
                  device: str | torch.device = "cpu", seed: int = 0) -> dict[str, float]:
    """The sums of `validation_sums` and, over them, the objective's summarized metrics."""
    sums = validation_sums(model, objective, batches, batch_size, device, seed)
    return {**sums, **objective.summarize(sums, batches)}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside DDP and torch.compile wrappers (for its heads)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# logits of at most this many vocabulary entries exist at once in a loss over selected positions
LOSS_CHUNK_LOGITS = 1 << 22  # 16 MB in fp32 (85 positions of a 49k vocabulary)


def loss_rows(vocab_size: int) -> int:
    """Positions per chunk of `selected_lm_loss`: LOSS_CHUNK_LOGITS logits, at least 64 positions."""
    return max(64, LOSS_CHUNK_LOGITS // max(1, vocab_size))


def _loss_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head.lm_logits(hidden).float(), labels, reduction="sum")


def selected_lm_loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from final hidden states (B, T, C), computed only where the label is
    not IGNORE_INDEX, a chunk of positions at a time.

    The full (B, T, V) logits never exist: the output head runs on the positions the loss counts,
    and each chunk's logits are recomputed in the backward pass (activation checkpointing) rather
    than kept, so a chat row of 2,048 tokens and a 49k vocabulary needs 16 MB of logits, not 400 MB.
    """
    keep = labels != IGNORE_INDEX
    h, y = hidden[keep], labels[keep]
    if not len(y):  # no token to learn from: a zero that still reaches every parameter
        return hidden.sum() * 0.0
    head, rows = unwrap(model), loss_rows(unwrap(model).config.vocab_size)
    if len(y) <= rows:
        return _loss_sum(head, h, y) / len(y)
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(_loss_sum, head, h[i:i + rows], y[i:i + rows], use_reentrant=False)
                for i in range(0, len(y), rows))
    return total / len(y)


@torch.no_grad()
def selected_lm_sums(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Summed cross-entropy, count and correct next-token guesses over the positions whose label is not
    IGNORE_INDEX, from final hidden states, a chunk of positions at a time (for validation)."""
    keep = labels != IGNORE_INDEX
    h, y = hidden[keep], labels[keep]
    head, rows = unwrap(model), loss_rows(unwrap(model).config.vocab_size)
    total, correct = 0.0, 0
    for i in range(0, len(y), rows):
        logits = head.lm_logits(h[i:i + rows]).float()
        total += float(F.cross_entropy(logits, y[i:i + rows], reduction="sum"))
        correct += int((logits.argmax(-1) == y[i:i + rows]).sum())
    return {"loss_sum": total, "count": float(len(y)), "correct": float(correct)}


class CausalLM(Objective):
    """Next-token prediction on random blocks of the token shards (nanoGPT's get_batch)."""

    def __init__(self, data_dir: str | Path, block_size: int):
        self.block_size = block_size
        self.splits = {split: TokenShards(data_dir, split) for split in ("train", "val")}
        for shards in self.splits.values():
            shards.check_block(block_size)

    def sample(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.splits[split].sample(n, self.block_size, generator)

    def collate(self, split: str, items: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y = self.splits[split].blocks(items, self.block_size)
        return {"input_ids": x, "labels": y}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(model(batch["input_ids"]), batch["labels"])

    def step_shape(self, batch_size: int) -> tuple[int, Optional[int]]:
        """(tokens of a micro-batch, None: the loss takes every token's logits), for train.memory."""
        return batch_size * self.block_size, None
