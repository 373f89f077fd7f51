"""Verbs for understanding and choosing models: explain, report, plan.

    chatforge explain --text "The cat sat on the" --layer 0 --head 1 --out attn.png   # attention heatmap
    chatforge explain --mode tokens --text "Hi" --chat           # each generated token: probability, alternatives
    chatforge explain --mode lens --text "The cat sat on the"    # logit lens: what each layer predicts
    chatforge explain --mode attribution --model runs/spam/best --text "WIN a prize now"   # why this label
    chatforge report runs/shakespeare                             # runs/shakespeare/report.html
    chatforge plan 1.3B --gpu-gb 24                               # what a model needs; what fits here
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from chatforge.errors import ChatforgeError

MODES = ("attention", "tokens", "lens", "attribution")
DEFAULT_OUT = {"attention": "attention.png", "lens": "logit_lens.png", "attribution": "attribution.html"}


# --- explain ------------------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    from chatforge.loader import load

    if not args.text:
        raise ChatforgeError("no text to explain: pass --text \"...\"")
    model, tok = load(args.model, device=args.device)
    out = args.out or DEFAULT_OUT.get(args.mode)
    if args.mode == "attention":
        return _attention(model, tok, args, out)
    if args.mode == "tokens":
        return _tokens(model, tok, args, out)
    if args.mode == "lens":
        return _lens(model, tok, args, out)
    return _attribution(model, tok, args, out)


def _attention(model, tok, args, out: str) -> int:
    from chatforge.explain.attention import explain_attention

    path = explain_attention(model, tok, args.text, layer=args.layer, head=args.head, out_png=out, grid=args.grid)
    print(f"wrote {path}")
    return 0


def _tokens(model, tok, args, out) -> int:
    from chatforge.explain.attention import attention_figure
    from chatforge.explain.common import token_labels
    from chatforge.figures import save_figure
    from chatforge.explain.tokens import explain_generation

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                   alternatives=args.top_k)
    prompt = args.text
    if args.chat:
        from chatforge.chat.template import ChatFormat

        chat = ChatFormat.for_tokenizer(tok)
        prompt = chat.encode([{"role": "user", "content": args.text}])
        options.update(stop=chat.stop, stop_token_ids=chat.stop_token_ids)
    g = explain_generation(model, tok, prompt, **options)
    if args.json:
        print(json.dumps(g.to_dict(), ensure_ascii=False))
    else:
        print(f"generated: {g.text!r} ({g.finish_reason})\n{g.table()}")
    if out and len(g.trace) > 1:
        fed = g.prompt_ids + [s["id"] for s in g.steps][:-1]
        fig = attention_figure(g.attention_maps(), token_labels(tok, fed), layer=args.layer, head=args.head,
                               grid=args.grid)
        print(f"wrote {save_figure(fig, out)}")
    return 0


def _lens(model, tok, args, out: str) -> int:
    from chatforge.explain.tokens import logit_lens

    lens = logit_lens(model, tok, tok.encode(args.text), top_k=args.top_k)
    print(json.dumps(lens.to_dict(), ensure_ascii=False) if args.json else lens.table())
    print(f"wrote {lens.save_png(out)}")
    return 0


def _attribution(model, tok, args, out: str) -> int:
    from chatforge.utils import atomic_write_text
    from chatforge.explain.attribution import attribute_text

    target = int(args.target) if args.target is not None and args.target.isdigit() else args.target
    a = attribute_text(model, tok, args.text, target=target, method=args.method)
    if args.json:
        print(json.dumps(a.to_dict(), ensure_ascii=False))
    else:
        peak = max(abs(s) for s in a.scores) or 1.0
        print(f"why {a.target!r} (p = {a.prob:.3g}), {a.method}:")
        for label, score in zip(a.labels, a.scores):
            bar = ("+" if score >= 0 else "-") * round(20 * abs(score) / peak)
            print(f"  {label[:16]:<16}{score:+10.4f}  {bar}")
    if Path(out).suffix.lower() == ".png":
        a.save_png(out)
    else:
        atomic_write_text(out, a.html_page())
    print(f"wrote {out}")
    return 0


# --- report and plan --------------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from chatforge.train.report import write_report

    path, summary = write_report(args.run_dir, args.out, tolerance=args.tolerance, patience=args.patience,
                                 png_dir=args.png_dir)
    if args.json:
        print(json.dumps(summary))
        return 0
    over = summary["overfitting"]
    print(f"wrote {path}")
    print(f"steps {summary['steps']}, final train loss {_num(summary['final_train_loss'])}, "
          f"best validation loss {_num(summary['best_val_loss'])} at step {summary['best_val_step']}")
    print(f"overfitting: began at step {over['began_step']}" if over else "overfitting: none detected")
    return 0


def _num(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def cmd_plan(args: argparse.Namespace) -> int:
    from chatforge.sizing.plan import plan

    p = plan(args.model, ram_gb=args.ram_gb, gpu_gb=args.gpu_gb, tflops=args.tflops,
             bandwidth_gbs=args.bandwidth_gbs, batch_size=args.batch_size, seq_len=args.seq_len,
             lora_rank=args.lora_rank, mfu=args.mfu, measure=args.measure)
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.format())
    return 0


def register(sub) -> None:
    """Add explain, report and plan to the `chatforge` parser."""
    p = sub.add_parser("explain", help="see inside a model: attention heatmaps, token alternatives, logit lens, "
                                       "input attribution")
    p.add_argument("--model", default=None, help="checkpoint directory, Hugging Face id, or chatforge-demo (default)")
    p.add_argument("--text", required=True, help="the text to explain (the prompt, for --mode tokens)")
    p.add_argument("--mode", choices=MODES, default="attention",
                   help="attention: heatmap PNG; tokens: generate and show each token's alternatives; "
                        "lens: what each layer predicts; attribution: which input tokens drove the decision")
    p.add_argument("--layer", type=int, default=None, help="attention layer (negative counts from the end; "
                                                           "default the last)")
    p.add_argument("--head", type=int, default=None, help="attention head (default: the mean over heads)")
    p.add_argument("--grid", action="store_true", help="every head of the layer, one small heatmap each")
    p.add_argument("--out", default=None, help="output file (attention.png, logit_lens.png, attribution.html or "
                                               ".png; for tokens: an attention heatmap of the generation)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (--mode tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (--mode tokens)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the text as a user message in the chat template")
    p.add_argument("--top-k", type=int, default=5, help="alternatives shown per token")
    p.add_argument("--target", default=None, help="attribution: the label (classifier) or next words (language "
                                                  "model) to explain; default what the model predicts")
    p.add_argument("--method", choices=("grad_x_input", "rollout"), default="grad_x_input")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", help="one HTML page of a training run: loss curves, lr, gradient norm, "
                                      "tokens/s, overfitting")
    p.add_argument("run_dir", help="a training run's output directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the page (default RUN_DIR/report.html)")
    p.add_argument("--png-dir", default=None, help="also write every figure as a PNG into this folder")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative rise of validation loss over its "
                                                                 "minimum that counts")
    p.add_argument("--patience", type=int, default=3, help="evaluations in a row the rise must last")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plan", help="what a model needs (memory, speed, compute) and the largest preset "
                                    "that fits this machine", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="parameter count (125M, 1.3B), preset, config.json (or its directory) or "
                                 "Hugging Face id")
    p.add_argument("--ram-gb", type=float, default=None, help="plan for this much RAM (default: this machine's)")
    p.add_argument("--gpu-gb", type=float, default=None, help="plan for a GPU with this much memory")
    p.add_argument("--tflops", type=float, default=None, help="dense matmul TFLOP/s (default: measured here)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth in GB/s (default: measured)")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch")
    p.add_argument("--seq-len", type=int, default=None, help="fine-tuning sequence length (default: the context, "
                                                             "at most 2048)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the matmul rate training reaches")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate this machine's speeds (about a second)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
