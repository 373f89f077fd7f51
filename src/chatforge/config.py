"""Configuration dataclasses, size presets and their JSON round-trip.

ModelConfig describes every Transformer chatforge can build: GPT-style decoders,
Llama-style decoders and BERT-style encoders are one class with different options,
so the Hugging Face mappings, the trainer and the engine never need a second model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from chatforge.errors import ConfigError

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none")
MLP_TYPES = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh")
ROPE_TYPES = ("linear", "llama3")  # rope_scaling["rope_type"] values the rotary encoding implements
NORM_TYPES = ("layernorm", "rmsnorm")
TASKS = ("lm", "classify", "features")
POOLINGS = ("cls", "last", "mean", "max")


@dataclass
class ModelConfig:
    """Shape and options of one Transformer (saved as config.json)."""

    vocab_size: int = 512
    block_size: int = 256  # longest sequence the model is trained for (context length)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: Optional[int] = None  # grouped-query attention; None = n_head (plain multi-head)
    head_dim: Optional[int] = None  # None = n_embd // n_head
    intermediate_size: Optional[int] = None  # MLP width; None = 4*n_embd (gelu) or ~8/3*n_embd (swiglu)
    pos_encoding: str = "learned"  # learned | sinusoidal | rope | none
    rope_theta: float = 10000.0
    # Hugging Face's rope_scaling dict: {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; None = plain rotary
    rope_scaling: Optional[dict[str, Any]] = None
    rope_local_theta: Optional[float] = None  # rotary base of the sliding-window layers (Gemma 3); None = rope_theta
    mlp: str = "gelu"  # gelu | gelu_tanh | relu | swiglu | geglu_tanh (gated, GELU-tanh gate: Gemma)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), its weight stored around 0 (Gemma)
    sandwich_norm: bool = False  # also a norm on the attention's and the MLP's output, before the residual add (Gemma 3)
    post_norm: bool = False  # norm after each residual add, x = norm(x + f(x)), and no final norm (BERT, RoBERTa)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before the rotary encoding (Qwen3, Gemma 3)
    embd_scale: Optional[float] = None  # token embeddings multiplied by this (Gemma: sqrt(n_embd)); None = 1
    bias: bool = True  # biases in linear layers and norms
    qkv_bias: Optional[bool] = None  # override for the q/k/v projections (GPT-Neo: False, Qwen2: True)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    dropout: float = 0.0
    sliding_window: Optional[int] = None  # local attention span (keys with q-k < window are seen)
    local_layers: Optional[list[int]] = None  # layers that use the window; None = all when a window is set
    attn_scale: Optional[float] = None  # None = 1/sqrt(head_dim); GPT-Neo uses 1.0
    causal: bool = True  # False = bidirectional encoder (BERT)
    type_vocab_size: int = 0  # segment (token-type) embeddings, 2 for BERT
    embd_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    position_offset: int = 0  # learned positions start here, padding sits one below (RoBERTa: padding_idx + 1)
    mlm_head: bool = False  # BERT's masked-LM head: dense + activation + norm, then the vocabulary projection with a bias
    init_std: float = 0.02
    # a sequence-level head (BERT's next-sentence head, a fine-tuned classifier): off for plain LMs
    # lm: the output is token logits (causal or masked LM) | classify: one label per sequence | features: the
    # output is the final hidden states (an encoder without an LM head: BertModel, sentence-transformers' models)
    task: str = "lm"
    pooling: str = "cls"  # cls (first token) | last (last real token) | mean | max: one vector per sequence
    normalize: bool = False  # sentence embeddings are scaled to unit length (sentence-transformers' Normalize)
    embed_max_len: Optional[int] = None  # longest input of an embedding (sentence-transformers' max_seq_length); None = block_size
    pooler: bool = False  # dense + tanh over the pooled vector before the classifier (BERT)
    num_labels: int = 0  # > 0: a linear classifier over the pooled vector (2 for next-sentence prediction)
    labels: Optional[list[str]] = None  # the classifier's class names, in label-id order

    def __post_init__(self) -> None:
        self.validate()

    # --- derived values -------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp in ("swiglu", "geglu_tanh"):  # gated: keep the parameter count of a 4x GELU MLP, rounded to 64
            return 64 * ((int(8 * self.n_embd / 3) + 63) // 64)
        return 4 * self.n_embd

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of one layer, or None when it attends globally."""
        if self.sliding_window is None:
            return None
        if self.local_layers is None or layer in self.local_layers:
            return self.sliding_window
        return None

    # --- checks ------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse impossible shapes with a message that says which value to change.

        Every field is first checked for its type (an int is not a bool, a float is finite) and for
        a sane range (SIZE_LIMITS), so a corrupt config.json is refused before anything is built:
        even on the meta device a model of a billion layers would take hours to construct."""
        check_field_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ConfigError(f"{name} is {value}, beyond any real model (at most {limit:,}); "
                                  "the config is corrupt or mistyped")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"norm_eps must be between 0 and 1 (typically 1e-5 or 1e-6), got {self.norm_eps!r}")
        for name in ("rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.attn_scale is not None and not self.attn_scale > 0:
            raise ConfigError(f"attn_scale must be positive or None, got {self.attn_scale!r}")
        if self.local_layers is not None and not all(0 <= i < self.n_layer for i in self.local_layers):
            raise ConfigError(f"local_layers must hold layer numbers from 0 to n_layer - 1 ({self.n_layer - 1}), "
                              f"got {self.local_layers!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"n_head ({self.n_head}) must divide n_embd ({self.n_embd}); pick e.g. n_head="
                f"{_divisor_near(self.n_embd, self.n_head)} or set head_dim"
            )
        if self.n_kv_head is not None:
            if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
                raise ConfigError(f"n_kv_head ({self.n_kv_head}) must be positive and divide n_head ({self.n_head})")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"head_dim must be positive, got {self.head_dim}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ConfigError(f"pos_encoding must be one of {', '.join(POS_ENCODINGS)}, got {self.pos_encoding!r}")
        if self.pos_encoding == "rope" and self.dim_head % 2:
            raise ConfigError(f"rotary encoding needs an even head dimension, got {self.dim_head}")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"sinusoidal encoding needs an even n_embd, got {self.n_embd}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        for name in ("rope_scaling", "rope_local_theta"):
            if getattr(self, name) is not None and self.pos_encoding != "rope":
                raise ConfigError(f"{name} changes the rotary encoding, which needs pos_encoding='rope', "
                                  f"not {self.pos_encoding!r}")
        for name in ("rope_local_theta", "embd_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{name} must be a positive number or None, got {value!r}")
        if self.norm_plus_one and self.norm != "rmsnorm":
            raise ConfigError(f"norm_plus_one scales an RMSNorm by (1 + weight); it needs norm='rmsnorm', "
                              f"not {self.norm!r}")
        if self.mlp not in MLP_TYPES:
            raise ConfigError(f"mlp must be one of {', '.join(MLP_TYPES)}, got {self.mlp!r}")
        if self.norm not in NORM_TYPES:
            raise ConfigError(f"norm must be one of {', '.join(NORM_TYPES)}, got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size must be positive, got {self.intermediate_size}")
        if self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.post_norm and self.sandwich_norm:
            raise ConfigError("post_norm (a norm after each residual add) and sandwich_norm (norms inside the branches) "
                              "are two different block layouts; pick one")
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            raise ConfigError(f"position_offset must be a non-negative integer, got {self.position_offset!r}")
        if self.position_offset and self.pos_encoding != "learned":
            raise ConfigError(f"position_offset shifts learned positions; it needs pos_encoding='learned', "
                              f"not {self.pos_encoding!r}")
        if self.mlm_head and self.mlp not in ("gelu", "gelu_tanh", "relu"):
            raise ConfigError(f"the masked-LM head's transform uses the MLP's activation, which must be gelu, gelu_tanh "
                              f"or relu, not {self.mlp!r}")
        limit = self.embed_max_len
        if limit is not None and not (isinstance(limit, int) and 0 < limit <= self.block_size):
            raise ConfigError(f"embed_max_len must be a positive integer no larger than block_size "
                              f"({self.block_size}), got {limit!r}")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ConfigError(f"num_labels must be a non-negative integer, got {self.num_labels!r}")
        if self.task == "classify" and self.num_labels < 2:
            raise ConfigError(f"a classifier needs num_labels >= 2, got {self.num_labels}")
        if self.task == "features" and (self.mlm_head or self.num_labels):
            raise ConfigError("task='features' outputs hidden states: a model with a masked-LM head (mlm_head) is "
                              "task='lm', one with a classifier (num_labels) task='classify'")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ConfigError(f"labels has {len(self.labels)} names but num_labels is {self.num_labels}")

    # --- JSON round trip -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "chatforge", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        model_type = data.pop("model_type", "chatforge")
        if model_type != "chatforge":
            raise ConfigError(f"config has model_type {model_type!r}, not a chatforge config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from chatforge.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named size, optionally with some fields changed."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


GATED_MLPS = ("swiglu", "geglu_tanh")  # MLPs whose first matrix is gate and up together


def count_params(cfg: ModelConfig) -> int:
    """Parameters of Transformer(cfg), counted from the config (a tied output head counts once):
    what a model will weigh, known before anything is allocated."""
    C, V = cfg.n_embd, cfg.vocab_size
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    q, kv, f = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head, cfg.ffn_dim
    fc_out = 2 * f if cfg.mlp in GATED_MLPS else f  # a gated MLP's gate and up projections are one matrix

    def linear(n_in: int, n_out: int, bias: bool) -> int:
        return n_in * n_out + (n_out if bias else 0)

    block = ((4 if cfg.sandwich_norm else 2) * norm + linear(C, q + 2 * kv, qkv_bias) + linear(q, C, cfg.bias)
             + linear(C, fc_out, cfg.bias) + linear(f, C, cfg.bias))
    block += 2 * cfg.dim_head if cfg.qk_norm else 0  # one RMSNorm weight each for queries and keys
    n = V * C + cfg.n_layer * block + (0 if cfg.post_norm else norm)  # token embeddings, blocks, final norm
    n += (cfg.block_size + cfg.position_offset) * C if cfg.pos_encoding == "learned" else 0
    n += linear(C, C, True) + norm + V if cfg.mlm_head else 0  # BERT's MLM transform and the head's bias
    n += cfg.type_vocab_size * C + (norm if cfg.embd_norm else 0)
    n += 0 if cfg.tie_embeddings else V * C
    n += linear(C, C, True) if cfg.pooler else 0
    n += linear(C, cfg.num_labels, True) if cfg.num_labels else 0
    return n


# the largest value each size field may have: far beyond any real model (Llama 3.1 405B has 126 layers,
# width 16,384, 53,248 MLP units; Gemma 3 a 262k vocabulary; Llama 4 a 10M-token context), yet small
# enough that merely describing the model (on the meta device, for shape checks) takes seconds, not hours
SIZE_LIMITS: dict[str, int] = {"vocab_size": 1 << 24, "block_size": 1 << 25, "n_layer": 512, "n_head": 4096,
                               "n_kv_head": 4096, "n_embd": 1 << 17, "head_dim": 1 << 14,
                               "intermediate_size": 1 << 20, "sliding_window": 1 << 25, "type_vocab_size": 1 << 16,
                               "position_offset": 1 << 16, "embed_max_len": 1 << 25, "num_labels": 1 << 20}


def check_field_types(obj: Any) -> None:
    """Refuse a dataclass field whose value is not of its annotated type: an int field must hold an
    int (not a bool or a float), a float field a finite number, a bool field a bool, a list a list of
    its item type; Optional fields may be None. JSON files and Python callers alike are held to it."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        why = _type_problem(_hints(type(obj))[f.name], value)
        if why:
            raise ConfigError(f"{f.name} must be {why}, got {value!r}"[:300])


def _hints(cls: type) -> dict[str, Any]:
    cached = _HINTS.get(cls)
    if cached is None:
        cached = _HINTS[cls] = typing.get_type_hints(cls)
    return cached


_HINTS: dict[type, dict[str, Any]] = {}


def _type_problem(hint: Any, value: Any) -> Optional[str]:
    """What `value` should be for the annotation `hint`, or None when it is that."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        hint = args[0]
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if typing.get_origin(hint) is list:
        (inner,) = typing.get_args(hint)
        ok = isinstance(value, list) and all(_type_problem(inner, v) is None for v in value)
        return None if ok else f"a list of {inner.__name__} values"
    if typing.get_origin(hint) is dict:
        return None if isinstance(value, dict) else "an object (a dict)"
    return None


def _check_rope_scaling(scaling: Any) -> None:
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a dict like {{'rope_type': 'linear', 'factor': 2.0}}, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not implemented; chatforge's rotary encoding does "
                          f"{', '.join(ROPE_TYPES)}")
    need = ["factor"] + (["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                         if kind == "llama3" else [])
    for key in need:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"rope_scaling[{key!r}] must be a positive number for {kind} scaling, got {value!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError("rope_scaling['high_freq_factor'] must be larger than its 'low_freq_factor' for llama3 "
                          f"scaling, got {scaling['high_freq_factor']} and {scaling['low_freq_factor']}")


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


_NEO = dict(pos_encoding="learned", mlp="gelu_tanh", qkv_bias=False, attn_scale=1.0, vocab_size=50257,
            block_size=2048, sliding_window=256)

PRESETS: dict[str, dict[str, Any]] = {
    # for tests: builds in milliseconds
    "test": dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32),
    # nanoGPT's shakespeare_char CPU recipe shape
    "nano": dict(block_size=64, n_layer=4, n_head=4, n_embd=128),
    # the built-in demo chat model's shape
    "mini": dict(block_size=512, n_layer=6, n_head=6, n_embd=384, n_kv_head=2, pos_encoding="rope",
                 mlp="swiglu", norm="rmsnorm", bias=False, tie_embeddings=True),
    "gpt2-124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, mlp="gelu_tanh"),
    "gpt-neo-125m": dict(_NEO, n_layer=12, n_head=12, n_embd=768, local_layers=[1, 3, 5, 7, 9, 11]),
    "gpt-neo-1.3b": dict(_NEO, n_layer=24, n_head=16, n_embd=2048,
                         local_layers=list(range(1, 24, 2))),
    "llama-1b": dict(vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                     head_dim=64, intermediate_size=8192, pos_encoding="rope", rope_theta=500000.0,
                     mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, bias=False, tie_embeddings=True),
    "bert-mini": dict(block_size=128, n_layer=4, n_head=4, n_embd=256, causal=False, type_vocab_size=2,
                      embd_norm=True, mlp="gelu", norm_eps=1e-12),
}


@dataclass
class TrainConfig:
    """How to train: every field is also a `chatforge pretrain`/`finetune` flag."""

    out_dir: str = "runs/pretrain"
    max_steps: int = 2000
    batch_size: int = 12  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step, summed over all processes
    lr: float = 1e-3
    min_lr: Optional[float] = None  # end of the decay; None = lr / 10
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 = off
    eval_interval: int = 250
    eval_iters: int = 20
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    metric: str = "val_loss"  # the evaluation result that picks `best` and counts towards patience
    metric_mode: str = "min"  # min | max: whether a lower or a higher `metric` is better
    restore_best: bool = False  # end training with the best evaluation's weights, not the last step's
    save_interval: Optional[int] = None  # steps between `last` checkpoints; None = eval_interval
    log_interval: int = 10
    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 1337
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_field_types(self)
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.save_interval is not None and self.save_interval <= 0:
            raise ConfigError(f"save_interval must be positive, got {self.save_interval}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        if self.warmup_steps < 0 or self.patience < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps, patience, weight_decay and grad_clip must not be negative")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.metric_mode not in ("min", "max"):
            raise ConfigError(f"metric_mode must be min or max, got {self.metric_mode!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("beta1 and beta2 must be in [0, 1)")
        if not 0 <= self.seed < 1 << 63:
            raise ConfigError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
