"""Causal-LM pre-training: text in, a checkpoint directory out.

    from chatforge import ModelConfig, TrainConfig
    from chatforge.train.pretrain import pretrain

    pretrain(["input.txt"], ModelConfig.preset("nano"), TrainConfig(out_dir="runs/shakespeare"))

What is particular to it: the text becomes token shards (data/shards.py) and the objective
is next-token prediction on random blocks of them (CausalLM); the rest is the training frame's.
Layout of out_dir: tokenizer.json (+ tokenizer_config.json), data/ (token shards and
meta.json), best/ and last/ checkpoints, train_config.json, metrics.jsonl, loss.png.
`chatforge pretrain` calls this function; under torchrun the same call trains with DDP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from chatforge.config import ModelConfig, TrainConfig
from chatforge.data.shards import find_inputs, iter_train_text, prepare_shards, split_offset
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.train.distributed import Dist
from chatforge.train.frame import new_model, run_training, save_and_prepare, starting_point
from chatforge.train.objectives import CausalLM


def pretrain(data: list[str], model_config: ModelConfig, train_config: TrainConfig, *,
             tokenizer: str = "char", vocab_size: Optional[int] = None, val_fraction: float = 0.1,
             resume: bool = False, init_from: Optional[str] = None) -> dict[str, Any]:
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


def _start(data: list[str], model_config: ModelConfig, train_config: TrainConfig, out: Path, dist: Dist, *,
           tokenizer: str, vocab_size: Optional[int], val_fraction: float,
           init_from: Optional[str]) -> tuple[Transformer, Tokenizer]:
    files = find_inputs(data)  # on every process, so that all of them fail alike
    split_offset(files, val_fraction)
    show = train_config.progress and dist.is_main
    model, tok = starting_point(tokenizer, iter_train_text(files, val_fraction), vocab_size=vocab_size,
                                init_from=init_from, dist=dist, progress=show)
    tok = save_and_prepare(out, tok, dist, lambda tok: prepare_shards(files, tok, out / "data",
                                                                      val_fraction=val_fraction, progress=show))
    if model is None:
        model = new_model(model_config, tok, train_config.seed)
    return model, tok


__all__ = ["pretrain"]
