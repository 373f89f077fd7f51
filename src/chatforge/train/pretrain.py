"""Causal-LM pre-training: text in, a checkpoint directory out.

    from chatforge import ModelConfig, TrainConfig
    from chatforge.train.pretrain import pretrain

    pretrain(["input.txt"], ModelConfig.preset("nano"), TrainConfig(out_dir="runs/shakespeare"))

Layout of out_dir: tokenizer.json (+ tokenizer_config.json), data/ (token shards and
meta.json), best/ and last/ checkpoints, train_config.json, metrics.jsonl, loss.png.
`chatforge pretrain` calls this function; under torchrun the same call trains with DDP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from chatforge.formats.checkpoint import is_checkpoint, load_checkpoint, load_model, load_tokenizer, load_trainer_state
from chatforge.config import ModelConfig, TrainConfig
from chatforge.data.shards import find_inputs, iter_train_text, prepare_shards, split_offset
from chatforge.errors import CheckpointError, ConfigError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer, train_tokenizer
from chatforge.train.distributed import Dist, setup_distributed
from chatforge.train.objectives import CausalLM, Objective
from chatforge.train.trainer import Trainer

VOCAB_MULTIPLE = 64  # pad the embedding table to a multiple of 64 rows: faster matmuls


def pretrain(data: list[str], model_config: ModelConfig, train_config: TrainConfig, *,
             tokenizer: str = "char", vocab_size: Optional[int] = None, val_fraction: float = 0.1,
             resume: bool = False, init_from: Optional[str] = None) -> dict:
    """Train a causal language model on text files, folders or globs; returns the final metrics.

    tokenizer: "char", "bpe" (trained on the training split) or a directory / tokenizer.json to reuse.
    resume: continue exactly from out_dir/last, reusing out_dir's tokenizer, shards and configs
        (`data` and `model_config` are then ignored; train_config fields changed from their
        defaults override the saved ones, e.g. a larger max_steps to train on).
    init_from: start from the weights, config and tokenizer of this checkpoint directory.
    """
    return run_training(
        train_config, resume=resume, init_from=init_from, title="pretrain",
        start=lambda out, dist: _start(data, model_config, train_config, out, dist, tokenizer=tokenizer,
                                       vocab_size=vocab_size, val_fraction=val_fraction, init_from=init_from),
        objective=lambda out, model, tok: CausalLM(out / "data", model.config.block_size))


def run_training(train_config: TrainConfig, *, resume: bool, init_from: Optional[str], title: str,
                 start: Callable[[Path, Dist], tuple[Transformer, Tokenizer]],
                 objective: Callable[[Path, Transformer, Tokenizer], Objective]) -> dict:
    """The frame every pre-training entry point shares: join the process group (under torchrun),
    start fresh with `start(out_dir, dist)` or continue out_dir/last exactly, then fit `objective`."""
    if resume and init_from:
        raise ConfigError("--resume continues OUT_DIR/last and --init-from starts a new run from other "
                          "weights: use one of them")
    dist = setup_distributed(train_config.device)
    try:
        out = Path(train_config.out_dir)
        state = None
        if resume:
            model, tok, train_config, state = _resume(out, train_config)
        else:
            model, tok = start(out, dist)
        trainer = Trainer(model, objective(out, model, tok), train_config, tokenizer=tok, dist=dist, state=state,
                          title=title)
        return trainer.fit()
    finally:
        dist.close()


def _start(data: list[str], model_config: ModelConfig, train_config: TrainConfig, out: Path, dist: Dist, *,
           tokenizer: str, vocab_size: Optional[int], val_fraction: float,
           init_from: Optional[str]) -> tuple[Transformer, Tokenizer]:
    if is_checkpoint(out / "last"):
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it, "
                          "or choose another --out-dir")
    files = find_inputs(data)  # on every process, so that all of them fail alike
    split_offset(files, val_fraction)
    show = train_config.progress and dist.is_main
    model, tok = None, None
    if init_from:
        model, tok = load_checkpoint(init_from)
    elif tokenizer in ("char", "bpe"):
        if dist.is_main:  # the others read it once it is saved
            tok = train_tokenizer(tokenizer, iter_train_text(files, val_fraction), vocab_size, show_progress=show)
    elif Path(tokenizer).exists():
        tok = Tokenizer.load(tokenizer)
    else:
        raise ConfigError(f"tokenizer must be char, bpe or a directory / tokenizer.json to reuse; "
                          f"{tokenizer!r} is none of these")
    if dist.is_main:
        tok.save(out)
        prepare_shards(files, tok, out / "data", val_fraction=val_fraction, progress=show)
    dist.barrier()
    if tok is None:
        tok = Tokenizer.load(out)
    if model is None:
        model_config.vocab_size = -(-tok.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        model_config.validate()
        torch.manual_seed(train_config.seed)  # the same initial weights on every process
        model = Transformer(model_config)
    return model, tok


def _resume(out: Path, given: TrainConfig) -> tuple[Transformer, Tokenizer, TrainConfig, dict[str, Any]]:
    last = out / "last"
    if not is_checkpoint(last):
        raise CheckpointError(f"nothing to resume: {last} does not exist; check --out-dir, "
                              "or start a new run without --resume")
    state = load_trainer_state(last)
    model = load_model(last)
    tok = load_tokenizer(last, model.config)
    defaults, wanted = TrainConfig().to_dict(), given.to_dict()
    merged = {**state.get("config", {}), **{k: v for k, v in wanted.items() if v != defaults.get(k)}}
    merged["out_dir"] = str(out)
    return model, tok, TrainConfig.from_dict(merged), state
