"""What one training step needs, estimated before the first one: the check that stops a run which
would otherwise grow until the kernel kills it without a word.

    need = step_memory(model, tokens=4 * 512, loss_tokens=900, bf16=False)   # {"gradients", ..., "total"}
    check_step_memory(model, objective, train_config, device)               # a ConfigError when it will not fit

The step's memory beyond the weights (which are in memory already): the gradients and AdamW's two
moments of every trainable parameter (4 + 8 bytes each), the activations the backward pass keeps
(`activation_bytes`, per token and layer), the output head's logits and their loss, and the
backward pass's own working buffers. `chatforge plan` uses the same activation rule.
"""
from __future__ import annotations

from typing import Optional

import torch

from chatforge.config import GATED_MLPS, ModelConfig, TrainConfig
from chatforge.errors import ConfigError
from chatforge.train.objectives import loss_rows, unwrap
from chatforge.utils import available_memory, human_bytes, pick_precision

# bytes per logit while the loss is computed: the logits in fp32, their softmax and its gradient (and a bf16
# copy under autocast)
LOGIT_BYTES = 12
# allocator slack and short-lived copies (the embedding's gradient scatter, fused AdamW's temporaries)
OVERHEAD = 1.1


def activation_bytes(cfg: ModelConfig, batch: int, seq: int, act_bytes: float,
                     logit_rows: Optional[int] = None) -> int:
    """Tensors the forward pass keeps for the backward pass, assuming fused attention (no T x T scores).

    Per token and layer: the two norm inputs and the linears' inputs (4C), q/k/v (twice with RoPE:
    before and after rotation), the attention output twice (kernel output and projection input), and
    the MLP's hidden activations (2F for GELU; 4F for SwiGLU: gate+up, silu, product). Then the final
    norm and head inputs, and the logits with their fp32 loss (about 12-14 bytes per logit) at
    `logit_rows` positions (default: every token; a classifier's: one row per sequence).
    """
    C, q, kv, f = cfg.n_embd, cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head, cfg.ffn_dim
    attention = (q + 2 * kv) * (2 if cfg.pos_encoding == "rope" else 1) + 2 * q
    per_layer = 4 * C + attention + (4 * f if cfg.mlp in GATED_MLPS else 2 * f)
    tokens = batch * seq
    if cfg.task == "classify":
        logits = batch * cfg.num_labels * 12
    else:
        rows = tokens if logit_rows is None else logit_rows
        logits = rows * cfg.vocab_size * (LOGIT_BYTES + 2 if act_bytes == 2 else LOGIT_BYTES)
    return int(tokens * (cfg.n_layer * per_layer + 3 * C) * act_bytes + logits)


def step_memory(model: torch.nn.Module, *, tokens: int, loss_tokens: Optional[int], bf16: bool) -> dict[str, int]:
    """Bytes one optimizer step of `model` needs beyond its weights, by part, and their "total".

    tokens: tokens of one micro-batch (rows x their length); loss_tokens: positions whose hidden
    states the loss selects and runs the output head on a chunk at a time (objectives.selected_lm_loss),
    None when the loss takes the logits of every token.
    """
    cfg: ModelConfig = model.config
    logit_rows = None if loss_tokens is None else min(loss_tokens, loss_rows(cfg.vocab_size))
    params = {id(p): p for p in model.parameters()}.values()  # a tied head counts once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    # bf16 autocast keeps some tensors twice (an fp32 residual stream and bf16 copies for the matmuls)
    act = activation_bytes(cfg, 1, tokens, 3 if bf16 else 4, logit_rows=logit_rows)
    C, f = cfg.n_embd, cfg.ffn_dim
    parts = {
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "activations": act,
        # the backward pass's working set: the activation gradient of the layer it is in, fp32
        "backward": 4 * tokens * max(3 * C, 2 * f),
        "selected": 4 * (loss_tokens or 0) * C * 2,  # the loss's hidden states and their gradient
    }
    parts["total"] = int(sum(parts.values()) * OVERHEAD)
    return parts


def check_step_memory(model: torch.nn.Module, objective, config: TrainConfig,
                      device: torch.device) -> Optional[dict[str, int]]:
    """Refuse, before the first step, a run whose step will not fit in the memory this process can
    still use on `device` ($CHATFORGE_MEMORY_LIMIT caps it): a one-line ConfigError that says how
    much it needs and what to lower. Objectives that do not know their step's shape are not checked."""
    shape = getattr(objective, "step_shape", None)
    if shape is None:
        return None
    tokens, loss_tokens = shape(config.batch_size)
    need = step_memory(unwrap(model), tokens=tokens, loss_tokens=loss_tokens,
                       bf16=pick_precision(config.precision, device) == "bf16")
    total = need["total"]
    if next(model.parameters()).device != device:  # the weights move there too
        total += sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    room = available_memory(device)
    if total > room:
        biggest = max(("activations", "gradients", "optimizer"), key=need.__getitem__)
        why = {"activations": f"mostly activations of {tokens:,} tokens per micro-batch",
               "gradients": "mostly gradients of the trainable weights",
               "optimizer": "mostly the optimizer's state of the trainable weights"}[biggest]
        raise ConfigError(f"one training step needs about {human_bytes(total)} more memory ({why}) but only "
                          f"{human_bytes(room)} is available; lower --batch-size, --block-size (now "
                          f"{config.batch_size} rows per micro-batch; raise --grad-accum to keep the batch the "
                          f"same){_lora_hint(model)}")
    return need


def _lora_hint(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ", or train LoRA adapters (--lora-rank 8)" if trainable == total and total > 50_000_000 else ""


__all__ = ["activation_bytes", "step_memory", "check_step_memory"]
