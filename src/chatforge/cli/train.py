"""Training verbs of the `chatforge` command: pretrain, finetune, eval.

Each verb parses its flags into ModelConfig / TrainConfig (one flag per field) and calls one
library function: `pretrain` / `pretrain_encoder`, `finetune_chat` / `finetune_classifier`, `evaluate`.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from chatforge.cli.args import add_dataclass_flags, dataclass_from_args
from chatforge.errors import ChatforgeError

OBJECTIVES = ("clm", "mlm", "mlm+nsp")
# what a fine-tuning run starts from when a flag is not given (pre-training keeps TrainConfig's own defaults)
FINETUNE_DEFAULTS: dict[str, dict[str, Any]] = {
    "chat": dict(out_dir="runs/finetune-chat", max_steps=500, lr=3e-4, warmup_steps=20, eval_interval=50,
                 log_interval=10, weight_decay=0.0),
    "classify": dict(out_dir="runs/finetune-classify", max_steps=1000, lr=1e-4, warmup_steps=50, batch_size=32,
                     eval_interval=100, log_interval=20, weight_decay=0.01, patience=4),
}


def _say(text: str) -> None:
    """Print once: under torchrun every process runs the verb, and only rank 0 reports."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from chatforge.config import PRESETS, ModelConfig, TrainConfig

    if not args.data and not args.resume:
        raise ChatforgeError("no training data: pass --data FILE_OR_FOLDER_OR_GLOB (one or more)")
    encoder = args.objective != "clm"
    preset = args.preset or ("bert-mini" if encoder else "nano")
    if preset not in PRESETS:
        raise ChatforgeError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    model_config = dataclass_from_args(ModelConfig, args, base=PRESETS[preset])
    train_config = dataclass_from_args(TrainConfig, args)
    common = dict(val_fraction=args.val_fraction, resume=args.resume, init_from=args.init_from)
    if encoder:
        from chatforge.train.mlm import pretrain_encoder

        result = pretrain_encoder(args.data, model_config, train_config, objective=args.objective,
                                  whole_word_mask=args.whole_word_mask, tokenizer=args.tokenizer or "bpe",
                                  vocab_size=args.vocab_size or 8192, mask_prob=args.mask_prob,
                                  sentences=args.sentences, max_seq_len=args.max_seq_len, **common)
    else:
        from chatforge.train.pretrain import pretrain

        result = pretrain(args.data, model_config, train_config, tokenizer=args.tokenizer or "char",
                          vocab_size=args.vocab_size, **common)
    extra = "".join(f", {k.replace('_', ' ')} {result[k]:.4f}" for k in ("mlm_accuracy", "nsp_accuracy") if k in result)
    _say(f"done: step {result['step']}, val loss {result['val_loss']:.4f} (best {result['best_val_loss']:.4f})"
         f"{extra}, {result['elapsed_s']:.0f}s; checkpoints in {result['out_dir']}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from chatforge.config import TrainConfig

    if not args.data and not (args.task == "chat" and args.resume):
        raise ChatforgeError("no training data: pass --data FILE (chat JSONL, or a CSV/TSV/JSONL table for classify)")
    train_config = dataclass_from_args(TrainConfig, args, base=FINETUNE_DEFAULTS[args.task])
    lora = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                lora_targets=args.lora_targets)
    if args.task == "chat":
        from chatforge.train.finetune import finetune_chat

        template = args.chat_template
        if template and Path(template).is_file():
            template = Path(template).read_text(encoding="utf-8")

        result = finetune_chat(args.data, args.model, train_config, val_data=args.val_data or None,
                               val_fraction=args.val_fraction, merge_lora=args.merge_lora,
                               chat_template=template, resume=args.resume, block_size=args.block_size,
                               **lora)
        _say(f"done: step {result['step']}, val loss {result['val_loss']:.4f} (best {result['best_val_loss']:.4f}); "
             f"chat with it: chatforge chat --model {result['model_dir']}")
        return 0
    from chatforge.train.evaluate import summary
    from chatforge.train.classify import finetune_classifier

    if args.resume:
        raise ChatforgeError("classification fine-tuning cannot resume yet: start it again with a new --out-dir")
    if len(args.data) != 1 or (args.val_data and len(args.val_data) != 1):
        raise ChatforgeError("--task classify takes one --data table (and at most one --val-data table)")
    result = finetune_classifier(args.data[0], args.model, train_config, text_column=args.text_column,
                                 label_column=args.label_column, text_pair_column=args.text_pair_column,
                                 val_data=args.val_data[0] if args.val_data else None, test_data=args.test_data,
                                 val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                 pooling=args.pooling, metric=args.classify_metric, dropout=args.dropout,
                                 max_length=args.max_length, random_init=args.random_init, **lora)
    for part in ("val", "test"):
        if result.get(part):
            print(f"[{part}]\n{summary(result[part])}")
    print(f"classifier in {result['model_dir']}; curves in {train_config.out_dir}/loss.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from chatforge.train.evaluate import evaluate, summary

    report = evaluate(args.model, args.data[0] if len(args.data) == 1 else args.data, text_column=args.text_column,
                      label_column=args.label_column, text_pair_column=args.text_pair_column,
                      batch_size=args.batch_size, max_length=args.max_length, sentences=args.sentences,
                      whole_word_mask=args.whole_word_mask, seed=args.seed, device=args.device, dtype=args.dtype,
                      quantize=args.quantize)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0


def _table_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("labelled tables (classification)")
    g.add_argument("--text-column", default="text" if required else None, help="column with the text")
    g.add_argument("--text-pair-column", default=None, help="column with the second text of a pair")
    g.add_argument("--label-column", default="label" if required else None, help="column with the label")


def register(sub: argparse._SubParsersAction) -> None:
    """Add pretrain, finetune and eval to the `chatforge` parser."""
    from chatforge.config import ModelConfig, TrainConfig

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("pretrain", formatter_class=fmt,
                       help="pre-train a model on raw text: causal LM, or BERT's masked LM (+ next sentence)")
    p.add_argument("--data", nargs="+", default=[], help="text files, folders or globs")
    p.add_argument("--objective", choices=OBJECTIVES, default="clm",
                   help="clm = next-token decoder; mlm / mlm+nsp = BERT-style encoder")
    p.add_argument("--preset", default=None, help="model size preset (default: nano for clm, bert-mini for mlm)")
    p.add_argument("--tokenizer", default=None,
                   help="char, bpe, or a directory/tokenizer.json to reuse (default: char for clm, bpe for mlm)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (mlm default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the corpus held out")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT_DIR/last")
    p.add_argument("--init-from", default=None, help="start from the weights of this checkpoint")
    g = p.add_argument_group("masked LM (--objective mlm / mlm+nsp)")
    g.add_argument("--mask-prob", type=float, default=0.15, help="share of tokens chosen for prediction")
    g.add_argument("--whole-word-mask", action="store_true", help="mask every piece of a chosen word")
    g.add_argument("--sentences", choices=("auto", "lines", "prose"), default="auto",
                   help="lines = one sentence per line, blank line between documents; prose = split sentences")
    g.add_argument("--max-seq-len", type=int, default=None, help="longest pair, [CLS]/[SEP] included")
    add_dataclass_flags(p, ModelConfig, skip=("vocab_size",), keep_defaults=False, title="model (overrides the preset)")
    add_dataclass_flags(p, TrainConfig, keep_defaults=False, title="training")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a model for chat or as a text classifier")
    p.add_argument("--task", choices=("chat", "classify"), default="chat")
    p.add_argument("--model", "--base-model", dest="model", default=None,
                   help="checkpoint dir, Hugging Face dir/id or chatforge-demo (default: the demo model)")
    p.add_argument("--data", nargs="+", default=[], help="chat JSONL files/folders/globs, or one labelled table")
    p.add_argument("--val-data", nargs="+", default=None, help="held-out data (default: a split of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out when --val-data is not given")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT_DIR/last (chat)")
    g = p.add_argument_group("chat")
    g.add_argument("--chat-template", default=None, help="a Jinja template file or 'chatml' (default: the model's)")
    g.add_argument("--block-size", type=int, default=None, help="length of packed rows (default: the context)")
    g.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="also save OUT_DIR/merged with the adapters folded in")
    _table_flags(p, required=True)
    g = p.add_argument_group("classify")
    g.add_argument("--test-data", default=None, help="labelled test table (default: a split of --data)")
    g.add_argument("--test-fraction", type=float, default=0.1, help="held out for test when --test-data is absent")
    g.add_argument("--pooling", choices=("cls", "last", "mean", "max"), default=None,
                   help="default: an encoder's sentence-transformers pooling (mean for all-MiniLM-L6-v2), else cls; "
                        "last for decoders")
    g.add_argument("--metric", dest="classify_metric", choices=("accuracy", "macro_f1"),
                   default="accuracy", help="picks the best checkpoint and drives early stopping")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--max-length", type=int, default=None, help="longest input in tokens")
    g.add_argument("--random-init", action="store_true", help="same shape, random weights (a baseline)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", nargs="+", default=["qkv", "proj"], help="module names to adapt")
    add_dataclass_flags(p, TrainConfig, skip=("metric", "metric_mode", "restore_best"), keep_defaults=False,
                        title="training (defaults depend on --task)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", formatter_class=fmt,
                       help="perplexity (causal LM), masked-LM accuracy (encoder) or accuracy/F1 (classifier)")
    p.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir/id or chatforge-demo")
    p.add_argument("--data", nargs="+", required=True, help="text files/folders/globs, or a labelled table")
    _table_flags(p, required=False)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--sentences", choices=("auto", "lines", "prose"), default="auto")
    p.add_argument("--whole-word-mask", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="fp32 or bf16")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="score the weight-only quantized causal LM (what quantizing costs)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_eval)
