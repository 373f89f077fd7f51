"""The one training frame: what every training entry point does around its objective.

    run_training(TrainConfig(out_dir="runs/x"), title="pretrain", resume=False, init_from=None,
                 start=lambda out, dist: (model, tokenizer),          # a new run: data prepared, model built
                 objective=lambda out, model, tok: CausalLM(out / "data", 64))

`pretrain` (causal LM), `pretrain_encoder` (masked LM), `finetune_chat` and
`finetune_classifier` all run through `run_training`: join the process group (under
torchrun), refuse an out_dir that already holds a run, start fresh with the entry point's
`start` or continue out_dir/last exactly (`--resume`: the saved TrainConfig, overridden by
the fields given with non-default values), fit the entry point's objective on the one
Trainer, let `finish` add to the result, and leave the process group. What differs between
entry points (their data, their model, their objective) is all they write themselves.

The start of a pre-training run from text is shared too: `starting_point` (a checkpoint to
start from, or a tokenizer to train or reuse), `save_and_prepare` (the main process writes
the tokenizer and data, the others wait) and `new_model`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from chatforge.config import ModelConfig, TrainConfig, count_params
from chatforge.errors import CheckpointError, ConfigError
from chatforge.formats.checkpoint import (is_checkpoint, load_trainer_state, read_checkpoint, read_model,
                                          read_tokenizer)
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer, train_tokenizer
from chatforge.train.distributed import Dist, setup_distributed
from chatforge.train.memory import check_step_memory
from chatforge.train.objectives import Objective
from chatforge.train.trainer import Trainer
from chatforge.utils import available_memory, human_bytes

VOCAB_MULTIPLE = 64  # pad the embedding table to a multiple of 64 rows: faster matmuls
TRAINED_BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments

Start = Callable[[Path, Dist], tuple[Transformer, Tokenizer]]
MakeObjective = Callable[[Path, Transformer, Tokenizer], Objective]
Finish = Callable[[Trainer, dict[str, Any]], dict[str, Any]]


def run_training(train_config: TrainConfig, *, title: str, start: Start, objective: MakeObjective,
                 resume: bool = False, init_from: Optional[str] = None,
                 resume_model: Optional[Callable[[Path], Transformer]] = read_model,
                 finish: Optional[Finish] = None) -> dict[str, Any]:
    """Train `objective` as `train_config` says and return the Trainer's final metrics (as `finish` made them).

    start(out_dir, dist): the model and tokenizer of a new run, its data prepared under out_dir.
    objective(out_dir, model, tokenizer): what to train, for a new run and a resumed one alike.
    resume: continue exactly from out_dir/last, with the model `resume_model(out_dir / "last")`
        reads (None: this kind of run cannot resume) and the tokenizer saved with it.
    init_from: the checkpoint a new run starts from (its `start` reads it); not with resume.
    finish(trainer, result): after fit, on every process: what to add (files to write, figures);
        every process waits for the others before returning.
    """
    if resume and init_from:
        raise ConfigError("--resume continues OUT_DIR/last and --init-from starts a new run from other "
                          "weights: use one of them")
    check_out_dir(Path(train_config.out_dir))
    dist = setup_distributed(train_config.device)
    try:
        out = Path(train_config.out_dir)
        state = None
        if resume:
            last = resume_point(out)
            state = load_trainer_state(last)
            model = resume_model(last)
            tok = read_tokenizer(last, model.config)
            train_config = resumed_config(state, train_config)
        else:
            if is_checkpoint(out / "last"):
                again = "pass --resume to continue it, or " if resume_model is not None else ""
                raise ConfigError(f"{out} already holds a training run; {again}choose another --out-dir")
            model, tok = start(out, dist)
        task = objective(out, model, tok)
        check_step_memory(model, task, train_config, dist.device)  # before the optimizer allocates anything
        trainer = Trainer(model, task, train_config, tokenizer=tok, dist=dist, state=state, title=title)
        result = trainer.fit()
        if finish is not None:
            result = finish(trainer, result)
            dist.barrier()  # every file is written before anyone returns
        return result
    finally:
        dist.close()


def check_out_dir(out: Path) -> None:
    """Refuse an out_dir that cannot hold a run (a file, or a place this process may not create or
    write, such as /proc/x), before any work is done; it is created when missing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file, not a folder; choose another --out-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to --out-dir {out} ({e.strerror or type(e).__name__}); choose a folder "
                          "you can write to") from None


def resume_point(out: Path, *also: str) -> Path:
    """out/last, once it (and the files `also` names in out) exist; else the CheckpointError saying so."""
    last = out / "last"
    if not is_checkpoint(last) or not all((out / name).is_file() for name in also):
        extra = f" (or {', '.join(str(out / name) for name in also)})" if also else ""
        raise CheckpointError(f"nothing to resume: {last}{extra} does not exist; check --out-dir, "
                              "or start a new run without --resume")
    return last


def resumed_config(state: dict[str, Any], given: TrainConfig) -> TrainConfig:
    """The run's saved TrainConfig, with the fields `given` changed from their defaults put over it."""
    defaults, wanted = TrainConfig().to_dict(), given.to_dict()
    merged = {**state.get("config", {}), **{k: v for k, v in wanted.items() if v != defaults.get(k)}}
    merged["out_dir"] = str(Path(given.out_dir))
    return TrainConfig.from_dict(merged)


# --- the start of a pre-training run from text ----------------------------------------------------

def starting_point(tokenizer: str, train_texts: Iterable[str], *, vocab_size: Optional[int],
                   init_from: Optional[str], dist: Dist,
                   progress: bool) -> tuple[Optional[Transformer], Optional[Tokenizer]]:
    """(model, tokenizer) a new pre-training run starts from: init_from's checkpoint, or no model and
    a tokenizer trained on `train_texts` ("char", "bpe": on the main process only, the others get None
    and read it once it is saved) or reused (a directory or tokenizer.json)."""
    if init_from:
        return read_checkpoint(init_from)
    if tokenizer in ("char", "bpe"):
        if not dist.is_main:
            return None, None
        return None, train_tokenizer(tokenizer, train_texts, vocab_size, show_progress=progress)
    if Path(tokenizer).exists():
        return None, Tokenizer.load(tokenizer)
    raise ConfigError(f"tokenizer must be char, bpe or a directory / tokenizer.json to reuse; "
                      f"{tokenizer!r} is none of these")


def save_and_prepare(out: Path, tok: Optional[Tokenizer], dist: Dist,
                     prepare: Callable[[Tokenizer], Any]) -> Tokenizer:
    """The main process saves `tok` in out and prepares the data with it; every process then has it."""
    if dist.is_main:
        tok.save(out)
        prepare(tok)
    dist.barrier()
    return tok if tok is not None else Tokenizer.load(out)


def new_model(config: ModelConfig, tok: Tokenizer, seed: int) -> Transformer:
    """A freshly initialised model of `config` for `tok` (the vocabulary padded to VOCAB_MULTIPLE),
    with the same weights on every process."""
    config.vocab_size = -(-tok.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config.validate()
    params = count_params(config)
    need, room = TRAINED_BYTES_PER_PARAM * params, available_memory()
    if need > room:  # refused before a byte is allocated
        raise ConfigError(f"a model of {params:,} parameters needs about {human_bytes(need)} to train (fp32 weights, "
                          f"gradients and AdamW's two moments) but only {human_bytes(room)} is available; choose "
                          "a smaller --preset or lower --n-layer / --n-embd")
    torch.manual_seed(seed)
    return Transformer(config)


__all__ = ["run_training", "check_out_dir", "resume_point", "resumed_config", "starting_point", "save_and_prepare",
           "new_model",
           "VOCAB_MULTIPLE"]
