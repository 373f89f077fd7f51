"""Chat fine-tuning: a base model and JSONL conversations in, a chat model out.

    from chatforge import TrainConfig
    from chatforge.train.finetune import finetune_chat

    result = finetune_chat(["chats.jsonl"], "runs/pretrain/best", TrainConfig(out_dir="runs/sft", lr=3e-4))
    result["model_dir"]   # a normal checkpoint: chatforge chat --model runs/sft/best

What is particular to it: the base model and its chat template, the conversations packed by
data/chats.py, the ChatSFT objective of train/sft.py and LoRA; the run around them (early
stopping, resume, metrics.jsonl, loss.png) is the training frame's, as for pre-training.
The base model's tokenizer gets the ChatML template when it has none (or `chat_template`,
when given), and every checkpoint saved carries it.

With lora_rank > 0 the base weights are frozen and only LoRA adapters on `lora_targets`
train (chatforge.lora). best/ and last/ then hold the base weights plus the adapter
tensors; at the end adapter/ gets the adapters alone and, with merge_lora, merged/ a normal
checkpoint with the adapters folded into the weights of the best evaluation.

Layout of out_dir: finetune.json (what was asked), tokenizer files, data/{train,val}.npz +
meta.json, best/, last/, [adapter/, merged/], train_config.json, metrics.jsonl, loss.png.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from chatforge.chat.template import CHATML_TEMPLATE, ChatFormat
from chatforge.config import TrainConfig
from chatforge.data.chats import prepare_chats, read_chat_jsonl, split_conversations
from chatforge.errors import CheckpointError, ConfigError, DataError
from chatforge.export import save_adapter
from chatforge.formats.checkpoint import WEIGHTS, build_model, read_config, read_weights, save_checkpoint
from chatforge.lora import LoRAConfig, apply_lora, load_lora_state, merge_lora, split_state
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.train.distributed import Dist
from chatforge.train.frame import resume_point, run_training
from chatforge.train.sft import ChatSFT
from chatforge.train.trainer import Trainer
from chatforge.utils import atomic_write_text, read_json

SETTINGS = "finetune.json"
# without block_size, rows are as long as the longest conversation, but no longer than this (nor the context)
DEFAULT_BLOCK_LIMIT = 2048
TEMPLATES = {"chatml": CHATML_TEMPLATE}


def finetune_chat(data: list[str], base_model: str, train_config: TrainConfig, *,
                  val_data: Optional[list[str]] = None, val_fraction: float = 0.1, lora_rank: int = 0,
                  lora_alpha: float = 16, lora_dropout: float = 0.0, lora_targets: Sequence[str] = ("qkv", "proj"),
                  merge_lora: bool = True, chat_template: Optional[str] = None, resume: bool = False,
                  block_size: Optional[int] = None) -> dict[str, Any]:
    """Fine-tune `base_model` (a checkpoint dir, Hugging Face dir/id or "chatforge-demo") on chat JSONL.

    data / val_data: JSONL files, folders of .jsonl files or globs; without val_data a seeded
        random `val_fraction` of the conversations is held out.
    lora_rank: 0 = full fine-tuning; > 0 = LoRA adapters of that rank on `lora_targets`
        (module names: qkv, proj, fc, attn.proj, mlp.proj), scaled by lora_alpha / lora_rank.
    merge_lora: also save out_dir/merged, a normal checkpoint with the adapters folded in.
    chat_template: a Jinja chat template (or "chatml"); None = the tokenizer's own, else ChatML.
    resume: continue exactly from out_dir/last (data and model arguments are then ignored;
        changed train_config fields override the saved ones, as in `pretrain`).
    block_size: length of the packed training rows; None = as long as the longest conversation
        needs, at most DEFAULT_BLOCK_LIMIT (2,048) tokens or the model's context if shorter.
    Returns the Trainer's final metrics plus "model_dir" (the checkpoint to chat with),
    "adapter_dir" (LoRA only) and "data" (conversation counts, truncations).
    """
    out = Path(train_config.out_dir)
    if resume:  # the run's own settings, not the arguments
        settings = _saved_settings(out)
    else:
        settings = {"base_model": base_model, "lora": None, "block_size": block_size}
        if lora_rank:
            settings["lora"] = LoRAConfig(lora_rank, float(lora_alpha), lora_dropout, list(lora_targets)).to_dict()
    return run_training(
        train_config, resume=resume, title="finetune chat" + (" (LoRA)" if settings["lora"] else ""),
        start=lambda out, dist: _start(data, val_data, val_fraction, base_model, train_config, out, dist,
                                       chat_template=chat_template, settings=settings),
        resume_model=lambda last: _load_training_model(last, settings["lora"]).train(),
        objective=lambda out, model, tok: ChatSFT.from_dir(out / "data"),
        finish=lambda trainer, result: _finish(trainer, result, settings, merge_lora))


def _saved_settings(out: Path) -> dict[str, Any]:
    """The settings a run to resume was started with (finetune.json), or a CheckpointError."""
    resume_point(out, SETTINGS)
    settings = read_json(out / SETTINGS, CheckpointError, obj=True)
    settings.setdefault("lora", None)
    try:
        if not isinstance(settings["base_model"], str):
            raise TypeError("base_model")
        if settings["lora"] is not None:
            LoRAConfig(**settings["lora"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{out / SETTINGS} is corrupt; the run cannot be resumed, start a new one") from None
    return settings


def chat_tokenizer(tok: Tokenizer, chat_template: Optional[str]) -> Tokenizer:
    """The tokenizer with the template the model will be trained on (ChatML unless it has one)."""
    if chat_template:
        tok.chat_template = TEMPLATES.get(chat_template.lower(), chat_template)
    elif not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.chat_template == CHATML_TEMPLATE and tok.token_id("im_end") is None:
        warnings.warn("the tokenizer has no <|im_end|> token: ChatML turn markers will be learned as plain text "
                      "and replies end only at the end-of-text token", stacklevel=3)
    return tok


def _start(data: list[str], val_data: Optional[list[str]], val_fraction: float, base_model: str,
           train_config: TrainConfig, out: Path, dist: Dist, *, chat_template: Optional[str],
           settings: dict[str, Any]) -> tuple[Transformer, Tokenizer]:
    from chatforge.loader import load

    conversations = read_chat_jsonl(data)  # on every process, so that all of them fail alike
    if val_data:
        train, val = conversations, read_chat_jsonl(val_data)
    else:
        train, val = split_conversations(conversations, val_fraction, train_config.seed)
    model, tok = load(base_model, device="cpu", dtype="fp32")  # weights to train: a GGUF file dequantized
    if model.config.task != "lm" or not model.config.causal:
        raise ConfigError(f"{base_model} is not a causal language model; chat fine-tuning needs a decoder")
    tok = chat_tokenizer(tok, chat_template)
    asked = settings["block_size"]
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise ConfigError(f"block_size must be a positive number of tokens, got {asked!r}")
    block = min(asked or DEFAULT_BLOCK_LIMIT, model.config.block_size)
    if dist.is_main:
        tok.save(out)
        prepare_chats(train, val, ChatFormat.for_tokenizer(tok), block, out / "data", fit=asked is None)
        atomic_write_text(out / SETTINGS, json.dumps(settings, indent=2) + "\n")
    dist.barrier()
    model = model.float()  # train in fp32 weights (autocast does bf16 where the hardware has it)
    if settings["lora"]:
        apply_lora(model, LoRAConfig(**settings["lora"]))
    return model, tok


def _load_training_model(directory: Path, lora: Optional[dict]) -> Transformer:
    """A best/ or last/ checkpoint of this run: base weights, plus adapters for a LoRA run."""
    base, adapters = split_state(read_weights(directory / WEIGHTS))
    model = build_model(read_config(directory), base, source=str(directory))
    if lora:
        apply_lora(model, LoRAConfig(**lora))
        load_lora_state(model, adapters, str(directory))
    return model


def _finish(trainer: Trainer, result: dict[str, Any], settings: dict[str, Any], merge: bool) -> dict[str, Any]:
    """The result, with the data's counts, the checkpoint to chat with and, for LoRA, adapter/ and merged/."""
    out = trainer.out_dir
    result["data"] = read_json(out / "data" / "meta.json", DataError)
    result["model_dir"] = str(out / "best")
    if settings["lora"] and trainer.dist.is_main:
        result.update(_finish_lora(trainer, out, LoRAConfig(**settings["lora"]), settings["base_model"], merge))
    return result


def _finish_lora(trainer: Trainer, out: Path, lora: LoRAConfig, base_model: str, merge: bool) -> dict[str, Any]:
    """adapter/ (the adapters of the best evaluation) and, with merge, merged/ (a normal checkpoint)."""
    model = _load_training_model(out / "best", lora.to_dict())
    extra = {"adapter_dir": str(save_adapter(out / "adapter", model, lora, base_model))}
    if merge:
        merged = merge_lora(model).eval()
        save_checkpoint(out / "merged", merged, trainer.tokenizer,
                        extra_json={"training.json": {"step": trainer.best_step, "base_model": base_model,
                                                      "lora": lora.to_dict(), "merged": True}})
        extra["model_dir"] = str(out / "merged")
    else:
        extra["model_dir"] = None  # best/ holds adapter tensors: load the base model + adapter/
    return extra


@torch.no_grad()
def merge_adapter(base_model: str, adapter_dir: str, out_dir: str) -> Path:
    """Fold a saved adapter (adapter/) into its base model and save a normal checkpoint at out_dir."""
    from chatforge.loader import load, load_adapter

    model, tok = load(base_model, device="cpu", dtype="fp32")  # weights to merge into: a GGUF file dequantized
    model = model.float()
    load_adapter(model, adapter_dir)
    return save_checkpoint(out_dir, merge_lora(model).eval(), tok)


__all__ = ["finetune_chat", "merge_adapter", "chat_tokenizer"]
