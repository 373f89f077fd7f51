"""Training objectives: what the one Trainer trains.

An objective says where batches come from and how a batch becomes a loss. Drawing a
batch is two steps so that data parallelism stays exact: `sample` draws the items of
the whole global batch from the Trainer's generator (every process draws the same),
then `collate` loads only this process's slice. Pre-training is CausalLM below;
fine-tuning, masked-LM and classification add objectives here, not new loops.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge.data.shards import TokenShards

IGNORE_INDEX = -100  # label of positions that carry no loss (Hugging Face convention)


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

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens in a batch, for the tokens/s figure."""
        return int(batch["input_ids"].numel())

    def state_dict(self) -> dict:
        """Data position beyond the Trainer's generator (none for random sampling)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


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
