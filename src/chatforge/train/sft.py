"""Chat supervised fine-tuning (SFT): the objective whose loss falls only on what the assistant says.

    convs = read_chat_jsonl(["chats.jsonl"])              # chatforge.data.chats
    fmt = ChatFormat.for_tokenizer(tokenizer)             # the template the model will be chatted with
    packed = PackedChats.build(convs, fmt, block_size=256)
    objective = ChatSFT({"train": packed, "val": val_packed})
    Trainer(model, objective, TrainConfig(out_dir="run")).fit()

Reading, validating and packing conversations (with a loss mask that is 1 exactly on the
assistant's tokens and each reply's end-of-turn token) is data/chats.py's; this is the
objective: next-token loss on the masked tokens of random packed rows, and validation as
one pass over every validation row. `finetune_chat` (finetune.py) runs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chatforge.data.chats import PackedChats
from chatforge.train.objectives import FullValidation, selected_lm_loss, selected_lm_sums


class ChatSFT(FullValidation):
    """Next-token loss on the masked (assistant) tokens of random packed rows; validation makes one
    pass over every validation row and averages over its assistant tokens."""

    def __init__(self, splits: dict[str, PackedChats]):
        self.splits = splits

    @classmethod
    def from_dir(cls, data_dir: str | Path) -> "ChatSFT":
        return cls({s: PackedChats.load(Path(data_dir) / f"{s}.npz") for s in ("train", "val")})

    def sample(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.splits[split]), (n,), generator=generator)

    def collate(self, split: str, items: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.splits[split].batch(items.tolist())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # the output head runs only on the assistant's tokens, a chunk at a time: never (B, T, vocabulary) logits
        return selected_lm_loss(model, model(batch["input_ids"], logits="none"), batch["labels"])

    def val_size(self) -> int:
        return len(self.splits["val"])

    def evaluate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return selected_lm_sums(model, model(batch["input_ids"], logits="none"), batch["labels"])

    def step_shape(self, batch_size: int) -> tuple[int, int]:
        """(tokens of a micro-batch, of which the loss counts): the rows' length, and the most assistant
        tokens any batch_size rows hold."""
        per_row = np.sort(self.splits["train"].mask[:, 1:].sum(1))[::-1]
        return batch_size * self.splits["train"].block_size, int(per_row[:batch_size].sum())

    def summarize(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        count = max(1.0, sums.get("count", 0.0))
        val_loss = sums.get("loss_sum", 0.0) / count
        return {"val_loss": val_loss, "ppl": float(np.exp(min(val_loss, 50.0))),
                "token_accuracy": sums.get("correct", 0.0) / count}


__all__ = ["ChatSFT"]
