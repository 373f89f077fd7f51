"""Hugging Face model families, mapped onto chatforge's one Transformer.

A family knows two things: how its config.json becomes a ModelConfig (and back), and
where each chatforge tensor lives in its state dict. That second part is one table, a
WeightMap {chatforge name: Source}, read in one direction to load (formats.hf.read) and in
the other to export (formats.hf.export), so the two can never disagree about a name or a
layout. Pure data and config mapping: no file is touched here (sizing uses it too).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from chatforge.config import ROPE_TYPES, ModelConfig
from chatforge.errors import ChatforgeError, CheckpointError


@dataclass(frozen=True)
class Source:
    """Where one chatforge tensor lives in a Hugging Face state dict.

    Several names are stacked along dim 0 (q, k, v -> our fused qkv; gate, up -> our fc),
    with their lengths in `sizes`. No names at all means the Hugging Face layer has no such
    tensor while ours does (Llama with attention_bias but no mlp_bias): it loads as zeros.
    """

    names: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    transpose: bool = False  # GPT-2's Conv1D stores (in, out), nn.Linear stores (out, in)


ZEROS = Source()


def one(name: str, transpose: bool = False) -> Source:
    return Source((name,), transpose=transpose)


def stacked(names: tuple[str, ...], sizes: tuple[int, ...]) -> Source:
    return Source(names, sizes)


WeightMap = dict[str, Source]  # chatforge tensor name -> where it lives in a Hugging Face state dict


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    prefix: str  # what the *ForCausalLM class puts before the base model's tensor names
    to_config: Callable[[dict[str, Any]], ModelConfig]
    plan: Callable[[ModelConfig, dict[str, Any]], WeightMap]
    from_config: Optional[Callable[[ModelConfig], dict[str, Any]]]  # None: export_family never picks it
    ignored: tuple[str, ...] = ()  # suffixes of buffers some files carry that are not weights
    top_level: tuple[str, ...] = ("lm_head.",)  # head tensors stored beside the base model, never under `prefix`
    # encoders: the config fitted to the heads the weights carry (MLM head, pooler, next-sentence head), from
    # their names; to_config alone guesses them from config.json's `architectures`
    heads: Optional[Callable[[ModelConfig, dict[str, Any], set[str]], ModelConfig]] = None
    # encoders: the transformers class that holds a config's heads (None: `architecture` always)
    architecture_of: Optional[Callable[[ModelConfig], str]] = None


# --- reading config.json ---------------------------------------------------------------

def _need(hf: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise CheckpointError(f"config.json has no {keys[0]!r}, which a {hf.get('model_type')} model needs")


def unsupported(hf: dict[str, Any], what: str) -> ChatforgeError:
    return ChatforgeError(f"this {hf.get('model_type')} model uses {what}, which chatforge's Transformer "
                          "does not implement; pick a model without it")


_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "relu": "relu"}
_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _activation(hf: dict[str, Any], key: str, default: str) -> str:
    act = hf.get(key) or default
    if act not in _ACTIVATIONS:
        raise unsupported(hf, f"activation {act!r} ({key})")
    return _ACTIVATIONS[act]


def _rope(hf: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling) from either the transformers 4 or the transformers 5 spelling.

    transformers 4 writes rope_theta and a rope_scaling dict; 5 writes one rope_parameters dict
    holding both. Where a file has both, rope_scaling wins, as transformers 5 itself decides.
    """
    params = hf.get("rope_parameters") or {}
    spec = hf.get("rope_scaling") or params
    partial = spec.get("partial_rotary_factor", params.get("partial_rotary_factor", hf.get("partial_rotary_factor")))
    if partial not in (None, 1.0):
        raise unsupported(hf, "partial rotary embeddings (partial_rotary_factor)")
    theta = spec.get("rope_theta", hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    return float(theta), _rope_scaling(hf, spec)


def _rope_scaling(hf: dict[str, Any], spec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """chatforge's rope_scaling for one Hugging Face rope dict: None for plain rotary, else its type and numbers
    (ModelConfig checks that they are all there)."""
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise unsupported(hf, f"rope scaling {kind!r}")
    keys = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                          if kind == "llama3" else ())
    return {"rope_type": kind, **{key: spec.get(key) for key in keys}}


def _windows(hf: dict[str, Any], n_layer: int) -> tuple[Optional[int], Optional[list[int]]]:
    """Sliding window and the layers that use it, from layer_types or the family's own switch."""
    kind = hf.get("model_type")
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise unsupported(hf, f"attention layer types {', '.join(unknown)}")
        if len(types) != n_layer:
            raise CheckpointError(f"config.json lists {len(types)} layer_types for {n_layer} layers")
    if kind in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        return None, None  # Qwen keeps a sliding_window number that only use_sliding_window switches on
    if types is not None:
        local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif kind in ("mistral", "phi3"):
        local = list(range(n_layer))
    elif kind in ("qwen2", "qwen3"):
        local = list(range(hf.get("max_window_layers", 0), n_layer))
    elif kind == "gemma3_text":  # before layer_types: every pattern-th layer global, the others sliding
        pattern = hf.get("sliding_window_pattern", 6)
        local = [i for i in range(n_layer) if (i + 1) % pattern]
    else:
        local = []
    if not local or window is None:
        return None, None
    return int(window), local


# --- GPT-2 and GPT-Neo ---------------------------------------------------------------------

def gpt2_to_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("add_cross_attention"):
        raise unsupported(hf, "cross-attention (add_cross_attention)")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise unsupported(hf, "scale_attn_by_inverse_layer_idx")
    n_embd = _need(hf, "n_embd")
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size"), block_size=_need(hf, "n_positions", "n_ctx"),
        n_layer=_need(hf, "n_layer"), n_head=_need(hf, "n_head"), n_embd=n_embd,
        intermediate_size=hf.get("n_inner") or 4 * n_embd, pos_encoding="learned",
        mlp=_activation(hf, "activation_function", "gelu_new"), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0)


def neo_layer_types(hf: dict[str, Any]) -> list[str]:
    layers = hf.get("attention_layers")
    if not layers:  # [[["global", "local"], 12]] -> global, local, global, local, ...
        layers = [kind for pattern, repeat in _need(hf, "attention_types") for _ in range(repeat) for kind in pattern]
    unknown = sorted(set(layers) - {"global", "local"})
    if unknown:
        raise unsupported(hf, f"attention layer types {', '.join(unknown)}")
    if len(layers) != _need(hf, "num_layers"):
        raise CheckpointError(f"config.json lists {len(layers)} attention layers for {hf['num_layers']} layers")
    return layers


def neo_to_config(hf: dict[str, Any]) -> ModelConfig:
    n_embd = _need(hf, "hidden_size")
    local = [i for i, kind in enumerate(neo_layer_types(hf)) if kind == "local"]
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size"), block_size=_need(hf, "max_position_embeddings"),
        n_layer=_need(hf, "num_layers"), n_head=_need(hf, "num_heads"), n_embd=n_embd,
        intermediate_size=hf.get("intermediate_size") or 4 * n_embd, pos_encoding="learned",
        mlp=_activation(hf, "activation_function", "gelu_new"), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, qkv_bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        attn_scale=1.0,  # GPT-Neo never divides QK^T by sqrt(head_dim)
        sliding_window=hf.get("window_size", 256) if local else None, local_layers=local or None)


def gpt_plan(config: ModelConfig, hf: dict[str, Any]) -> WeightMap:
    neo = hf.get("model_type") == "gpt_neo"
    t = "transformer."
    plan: WeightMap = {"wte.weight": one(t + "wte.weight"), "wpe.weight": one(t + "wpe.weight"),
                  "norm_f.weight": one(t + "ln_f.weight"), "norm_f.bias": one(t + "ln_f.bias")}
    d = config.n_embd
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"{t}h.{i}."
        linears = [("norm1", "ln_1", False), ("norm2", "ln_2", False), ("mlp.fc", "mlp.c_fc", not neo),
                   ("mlp.proj", "mlp.c_proj", not neo)]
        if neo:
            a = theirs + "attn.attention."
            plan[ours + "attn.qkv.weight"] = stacked((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                                                     (d, d, d))
            linears.append(("attn.proj", "attn.attention.out_proj", False))
        else:
            linears += [("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True)]
        for mine, hf_name, conv1d in linears:
            plan[ours + mine + ".weight"] = one(theirs + hf_name + ".weight", transpose=conv1d)
            plan[ours + mine + ".bias"] = one(theirs + hf_name + ".bias")
    if not config.tie_embeddings:
        plan["lm_head.weight"] = one("lm_head.weight")
    return plan


def _gpt_common(config: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": config.vocab_size, "layer_norm_epsilon": config.norm_eps,
            "activation_function": _ACTIVATION_NAMES[config.mlp], "tie_word_embeddings": config.tie_embeddings,
            "initializer_range": config.init_std}


def gpt2_from_config(config: ModelConfig) -> dict[str, Any]:
    p = config.dropout
    return {**_gpt_common(config), "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_inner": config.ffn_dim,
            "scale_attn_weights": config.attn_scale != 1.0, "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}


def neo_from_config(config: ModelConfig) -> dict[str, Any]:
    layers = ["local" if config.layer_window(i) else "global" for i in range(config.n_layer)]
    p = config.dropout
    return {**_gpt_common(config), "hidden_size": config.n_embd, "num_layers": config.n_layer,
            "num_heads": config.n_head, "max_position_embeddings": config.block_size,
            "intermediate_size": config.ffn_dim, "attention_types": [[layers, 1]], "attention_layers": layers,
            "window_size": config.sliding_window or 256, "embed_dropout": p, "attention_dropout": p,
            "resid_dropout": p}


# --- Llama-style decoders: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3 --------------------------

def _biases(hf: dict[str, Any]) -> tuple[bool, bool, bool]:
    """Whether the q/k/v projections, o_proj and the MLP of a Llama-style family have biases."""
    kind = hf.get("model_type")
    if kind == "qwen2":
        return True, False, False
    attention = kind in ("llama", "qwen3", "gemma3_text") and bool(hf.get("attention_bias", False))
    return attention, attention, kind == "llama" and bool(hf.get("mlp_bias", False))


def _decoder(hf: dict[str, Any], *, head_dim: Optional[int] = None, **options: Any) -> ModelConfig:
    """The ModelConfig of a Llama-style decoder; `options` are what its family does differently."""
    n_embd, n_head = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    n_layer = _need(hf, "num_hidden_layers")
    window, local = _windows(hf, n_layer)
    qkv_bias, o_bias, mlp_bias = _biases(hf)
    base = dict(
        vocab_size=_need(hf, "vocab_size"), block_size=_need(hf, "max_position_embeddings"), n_layer=n_layer,
        n_head=n_head, n_embd=n_embd, n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or head_dim or n_embd // n_head, intermediate_size=_need(hf, "intermediate_size"),
        pos_encoding="rope", mlp="swiglu", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        # one `bias` switch covers o_proj and the MLP: a layer that lacks one of them loads zeros there
        bias=o_bias or mlp_bias, qkv_bias=qkv_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False), sliding_window=window, local_layers=local)
    return ModelConfig(**{**base, **options})


def _silu(hf: dict[str, Any]) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise unsupported(hf, f"activation {act!r} (hidden_act); chatforge's SwiGLU uses silu")


def llama_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Llama (2, 3.x with its llama3 rope scaling), Mistral, Qwen2."""
    _silu(hf)
    theta, scaling = _rope(hf)
    return _decoder(hf, rope_theta=theta, rope_scaling=scaling)


def qwen3_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen3: Qwen2 without q/k/v biases, with an RMSNorm over each head's queries and keys; its
    head_dim (128 unless the file says) need not be hidden_size / heads."""
    _silu(hf)
    theta, scaling = _rope(hf)
    return _decoder(hf, head_dim=128, rope_theta=theta, rope_scaling=scaling, qk_norm=True)


def phi3_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Phi-3 (and Phi-3.5/Phi-4-mini where plain rotary): Llama with q/k/v and gate/up fused in the file."""
    _silu(hf)
    spec = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = spec.get("rope_type", spec.get("type"))
    if kind in ("longrope", "su", "yarn"):
        raise unsupported(hf, f"rope scaling {kind!r} (the 128k-context Phi-3 models; the 4k ones use plain rotary)")
    theta, scaling = _rope(hf)
    return _decoder(hf, rope_theta=theta, rope_scaling=scaling)


def _gemma3_rope(hf: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]], float]:
    """(global theta, global scaling, sliding-window theta). transformers 5 writes one rope dict per layer type;
    4 wrote rope_theta + rope_scaling for the global layers and rope_local_base_freq for the sliding ones."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), params.get("sliding_attention") or {}
    else:
        full, local = dict(params), {}
    full.update(hf.get("rope_scaling") or {})
    if _rope_scaling(hf, local) is not None:
        raise unsupported(hf, "rope scaling on the sliding-window layers (rope_parameters.sliding_attention)")
    theta = full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    return float(theta), _rope_scaling(hf, full), float(local_theta)


def gemma3_to_config(hf: dict[str, Any]) -> ModelConfig:
    """Gemma 3 text (Gemma3ForCausalLM): embeddings times sqrt(hidden), (1 + w) RMSNorms, a norm before and
    after both attention and MLP, GeGLU-tanh, q/k norms, query_pre_attn_scalar, and sliding layers with
    their own rotary base interleaved with global ones."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise unsupported(hf, f"logit soft-capping ({key}={hf[key]})")
    if hf.get("use_bidirectional_attention"):
        raise unsupported(hf, "bidirectional attention (use_bidirectional_attention)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if _ACTIVATIONS.get(act) != "gelu_tanh":
        raise unsupported(hf, f"activation {act!r} (hidden_activation); chatforge's GeGLU uses the tanh GELU")
    theta, scaling, local_theta = _gemma3_rope(hf)
    hf = {"sliding_window": 4096, "num_key_value_heads": 4, **hf}  # Gemma3TextConfig's defaults
    n_embd = _need(hf, "hidden_size")
    return _decoder(hf, head_dim=256, mlp="geglu_tanh", rope_theta=theta, rope_scaling=scaling,
                    rope_local_theta=local_theta, qk_norm=True, norm_plus_one=True, sandwich_norm=True,
                    embd_scale=n_embd ** 0.5, attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                    tie_embeddings=hf.get("tie_word_embeddings", True))


def llama_plan(config: ModelConfig, hf: dict[str, Any]) -> WeightMap:
    """Where our tensors live in every Llama-style family: the layout is Llama's, plus what the config adds."""
    kind = hf.get("model_type")
    qkv_bias, o_bias, mlp_bias = _biases(hf)
    plan: WeightMap = {"wte.weight": one("model.embed_tokens.weight"), "norm_f.weight": one("model.norm.weight")}
    q, kv, ffn = config.n_head * config.dim_head, config.kv_heads * config.dim_head, config.ffn_dim
    for i in range(config.n_layer):
        ours, layer = f"blocks.{i}.", f"model.layers.{i}."
        a, m = layer + "self_attn.", layer + "mlp."
        plan[ours + "norm1.weight"] = one(layer + "input_layernorm.weight")
        if config.sandwich_norm:  # Gemma 3: post_attention_layernorm is the attention output's norm
            plan[ours + "post_attn_norm.weight"] = one(layer + "post_attention_layernorm.weight")
            plan[ours + "norm2.weight"] = one(layer + "pre_feedforward_layernorm.weight")
            plan[ours + "post_mlp_norm.weight"] = one(layer + "post_feedforward_layernorm.weight")
        else:
            plan[ours + "norm2.weight"] = one(layer + "post_attention_layernorm.weight")
        if kind == "phi3":  # already fused in the file, in our order: q, k, v and gate, up
            plan[ours + "attn.qkv.weight"] = one(a + "qkv_proj.weight")
            plan[ours + "mlp.fc.weight"] = one(m + "gate_up_proj.weight")
        else:
            for suffix in ("weight", "bias") if qkv_bias else ("weight",):
                plan[ours + "attn.qkv." + suffix] = stacked(
                    (f"{a}q_proj.{suffix}", f"{a}k_proj.{suffix}", f"{a}v_proj.{suffix}"), (q, kv, kv))
            plan[ours + "mlp.fc.weight"] = stacked((m + "gate_proj.weight", m + "up_proj.weight"), (ffn, ffn))
        if config.qk_norm:
            plan[ours + "attn.q_norm.weight"] = one(a + "q_norm.weight")
            plan[ours + "attn.k_norm.weight"] = one(a + "k_norm.weight")
        plan[ours + "attn.proj.weight"] = one(a + "o_proj.weight")
        plan[ours + "mlp.proj.weight"] = one(m + "down_proj.weight")
        if config.bias:
            plan[ours + "attn.proj.bias"] = one(a + "o_proj.bias") if o_bias else ZEROS
            plan[ours + "mlp.fc.bias"] = (stacked((m + "gate_proj.bias", m + "up_proj.bias"), (ffn, ffn))
                                          if mlp_bias else ZEROS)
            plan[ours + "mlp.proj.bias"] = one(m + "down_proj.bias") if mlp_bias else ZEROS
    if not config.tie_embeddings:
        plan["lm_head.weight"] = one("lm_head.weight")
    return plan


def _rope_json(config: ModelConfig) -> dict[str, Any]:
    """The rope dict transformers 5 reads (rope_parameters), with its type and theta."""
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    rest = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    return {"rope_type": kind, **rest, "rope_theta": config.rope_theta}


def _layer_types(config: ModelConfig) -> list[str]:
    return ["sliding_attention" if config.layer_window(i) else "full_attention" for i in range(config.n_layer)]


def _llama_from_config(kind: str) -> Callable[[ModelConfig], dict[str, Any]]:
    def convert(config: ModelConfig) -> dict[str, Any]:
        rope = _rope_json(config)
        out = {"vocab_size": config.vocab_size, "hidden_size": config.n_embd,
               "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layer,
               "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
               "head_dim": config.dim_head, "max_position_embeddings": config.block_size,
               "rms_norm_eps": config.norm_eps, "hidden_act": "silu", "rope_theta": config.rope_theta,
               # transformers 4 reads rope_theta + rope_scaling, 5 rope_parameters
               "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling else None,
               "rope_parameters": rope,
               "tie_word_embeddings": config.tie_embeddings, "attention_dropout": config.dropout,
               "initializer_range": config.init_std}
        if kind == "llama":
            out.update(attention_bias=config.bias, mlp_bias=config.bias)
        elif kind == "mistral":
            out["sliding_window"] = config.sliding_window
        elif kind == "qwen3":
            windowed = config.sliding_window is not None
            out.update(attention_bias=False, use_sliding_window=windowed, sliding_window=config.sliding_window,
                       max_window_layers=config.n_layer, layer_types=_layer_types(config))
        else:
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
        return out

    return convert


def gemma3_from_config(config: ModelConfig) -> dict[str, Any]:
    full = _rope_json(config)
    # sliding layers without a base of their own share the global rotary, scaling included, as ours do
    local = full if config.rope_local_theta is None else {"rope_type": "default", "rope_theta": config.rope_local_theta}
    scalar = config.dim_head if config.attn_scale is None else round(config.attn_scale ** -2)
    return {"vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": config.ffn_dim,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "head_dim": config.dim_head,
            "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
            "sliding_window": config.sliding_window or config.block_size, "layer_types": _layer_types(config),
            "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
            "use_bidirectional_attention": False, "tie_word_embeddings": config.tie_embeddings,
            "attention_dropout": config.dropout, "initializer_range": config.init_std}


# --- BERT-style encoders: BERT (and BERT-architecture checkpoints such as MiniLM), RoBERTa, DistilBERT ------------
#
# Post-norm blocks, a LayerNorm after the embeddings, exact-erf GELU, bidirectional attention with padding
# masks. The base model's weights are always there; which heads come with them depends on the class that
# saved them: BertModel (pooler; sentence-transformers' models), BertForMaskedLM (the MLM head),
# BertForPreTraining (both, and the next-sentence head). A checkpoint without an MLM head loads as
# task="features": its output is the final hidden states.

NSP_LABELS = ["is_next", "not_next"]  # BERT's next-sentence head, label 0 = B follows A (as chatforge's mlm+nsp)


@dataclass(frozen=True)
class EncoderNames:
    """Where an encoder family keeps each layer: the base model's prefix, each block's modules (after
    `layer`, which holds {i}) and the heads' (full names; None where the family has no such head)."""

    base: str
    layer: str
    q: str
    k: str
    v: str
    attn_out: str
    norm1: str
    fc: str
    mlp_out: str
    norm2: str
    pooler: Optional[str]
    mlm_dense: str
    mlm_norm: str
    mlm_decoder: str
    mlm_bias: str


_BERT_BLOCK = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                   attn_out="attention.output.dense", norm1="attention.output.LayerNorm", fc="intermediate.dense",
                   mlp_out="output.dense", norm2="output.LayerNorm")
ENCODER_NAMES = {
    "bert": EncoderNames("bert.", "bert.encoder.layer.{i}.", **_BERT_BLOCK, pooler="bert.pooler.dense",
                         mlm_dense="cls.predictions.transform.dense", mlm_norm="cls.predictions.transform.LayerNorm",
                         mlm_decoder="cls.predictions.decoder", mlm_bias="cls.predictions.bias"),
    "roberta": EncoderNames("roberta.", "roberta.encoder.layer.{i}.", **_BERT_BLOCK, pooler="roberta.pooler.dense",
                            mlm_dense="lm_head.dense", mlm_norm="lm_head.layer_norm", mlm_decoder="lm_head.decoder",
                            mlm_bias="lm_head.bias"),
    "distilbert": EncoderNames("distilbert.", "distilbert.transformer.layer.{i}.", q="attention.q_lin",
                               k="attention.k_lin", v="attention.v_lin", attn_out="attention.out_lin",
                               norm1="sa_layer_norm", fc="ffn.lin1", mlp_out="ffn.lin2", norm2="output_layer_norm",
                               pooler=None, mlm_dense="vocab_transform", mlm_norm="vocab_layer_norm",
                               mlm_decoder="vocab_projector", mlm_bias="vocab_projector.bias"),
}


def _encoder_checks(hf: dict[str, Any]) -> None:
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise unsupported(hf, f"relative position embeddings (position_embedding_type={kind!r})")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise unsupported(hf, "a decoder or cross-attention (is_decoder, add_cross_attention)")


def _with_heads(config: ModelConfig, hf: dict[str, Any], mlm: bool, pooler: bool, nsp: bool) -> ModelConfig:
    if mlm and hf.get("model_type") == "roberta" and config.mlp != "gelu":
        raise unsupported(hf, f"an MLM head with hidden_act {hf.get('hidden_act')!r} (RoBERTa's head uses gelu)")
    task = "lm" if mlm else "features"
    labels = dict(num_labels=2, labels=list(NSP_LABELS)) if nsp and pooler and mlm else {}
    return dataclasses.replace(config, mlm_head=mlm, pooler=pooler, task=task, **labels)


# ...ForSequenceClassification heads chatforge computes as pooler (dense + tanh over [CLS]) + classifier:
# BERT's pooler + `classifier`, RoBERTa's `classifier.dense` (+ tanh) + `classifier.out_proj`.
SEQUENCE_HEADS = {"bert": ("bert.pooler.dense", "classifier"), "roberta": ("classifier.dense", "classifier.out_proj")}


def _sequence_classifier(config: ModelConfig, hf: dict[str, Any]) -> ModelConfig:
    """A ...ForSequenceClassification checkpoint: single-label classes named by config.json's id2label."""
    arch = " ".join(hf.get("architectures") or [])
    if hf["model_type"] not in SEQUENCE_HEADS or "ForSequenceClassification" not in arch:
        raise unsupported(hf, "a task head other than BERT's or RoBERTa's sequence classifier (token "
                              "classification, question answering, DistilBERT's pre_classifier); chatforge reads the "
                              "base model, masked-LM, pre-training and sequence-classification checkpoints")
    id2label = hf.get("id2label") or {}
    n = int(hf.get("num_labels") or len(id2label) or 2)
    problem = hf.get("problem_type") or "single_label_classification"
    if n < 2 or problem != "single_label_classification":
        raise unsupported(hf, f"a {'regression' if n < 2 else problem} head (chatforge's classifier picks one "
                              "label of several)")
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    return dataclasses.replace(config, mlm_head=False, pooler=True, pooling="cls", task="classify", num_labels=n,
                               labels=labels)


def encoder_heads(config: ModelConfig, hf: dict[str, Any], names: set[str]) -> ModelConfig:
    """`config` with the heads whose weights are in `names` (full names, after the family's prefix)."""
    if any(head in name for name in names for head in ("classifier.", "qa_outputs.")):
        return _sequence_classifier(config, hf)
    table = ENCODER_NAMES[hf["model_type"]]
    mlm, pooler = table.mlm_dense + ".weight" in names, f"{table.pooler}.weight" in names
    return _with_heads(config, hf, mlm, pooler, "cls.seq_relationship.weight" in names)


def _heads_from_architectures(config: ModelConfig, hf: dict[str, Any]) -> ModelConfig:
    """The heads config.json's `architectures` names (the weights, when read, have the last word)."""
    arch = " ".join(hf.get("architectures") or [])
    return _with_heads(config, hf, "MaskedLM" in arch or "PreTraining" in arch,
                       hf["model_type"] != "distilbert" and "MaskedLM" not in arch, "PreTraining" in arch)


def bert_to_config(hf: dict[str, Any]) -> ModelConfig:
    """BERT, RoBERTa (positions numbered from padding_idx + 1, so max_position_embeddings has that many more)."""
    _encoder_checks(hf)
    roberta = hf.get("model_type") == "roberta"
    offset = int(hf.get("pad_token_id", 1)) + 1 if roberta else 0
    positions = _need(hf, "max_position_embeddings") - offset
    if positions <= 0:
        raise CheckpointError(f"config.json's max_position_embeddings leaves no position after padding_idx "
                              f"(pad_token_id {offset - 1})")
    config = ModelConfig(
        vocab_size=_need(hf, "vocab_size"), block_size=positions, n_layer=_need(hf, "num_hidden_layers"),
        n_head=_need(hf, "num_attention_heads"), n_embd=_need(hf, "hidden_size"),
        intermediate_size=_need(hf, "intermediate_size"), pos_encoding="learned", position_offset=offset,
        mlp=_activation(hf, "hidden_act", "gelu"), norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), causal=False, post_norm=True,
        embd_norm=True, type_vocab_size=hf.get("type_vocab_size", 1 if roberta else 2), pooling="cls")
    return _heads_from_architectures(config, hf)


def distilbert_to_config(hf: dict[str, Any]) -> ModelConfig:
    """DistilBERT: BERT without segment embeddings or pooler, its LayerNorm epsilon fixed at 1e-12."""
    _encoder_checks(hf)
    config = ModelConfig(
        vocab_size=_need(hf, "vocab_size"), block_size=_need(hf, "max_position_embeddings"),
        n_layer=_need(hf, "n_layers"), n_head=_need(hf, "n_heads"), n_embd=_need(hf, "dim"),
        intermediate_size=_need(hf, "hidden_dim"), pos_encoding="learned", mlp=_activation(hf, "activation", "gelu"),
        norm="layernorm", norm_eps=1e-12, bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        causal=False, post_norm=True, embd_norm=True, type_vocab_size=0, pooling="cls")
    return _heads_from_architectures(config, hf)


def _linear(plan: WeightMap, ours: str, theirs: str) -> None:
    plan[ours + ".weight"] = one(theirs + ".weight")
    plan[ours + ".bias"] = one(theirs + ".bias")


def encoder_plan(config: ModelConfig, hf: dict[str, Any]) -> WeightMap:
    """BERT's, RoBERTa's and DistilBERT's layout: one table of names per family (ENCODER_NAMES)."""
    names = ENCODER_NAMES[hf["model_type"]]
    e, d = names.base + "embeddings.", config.n_embd
    plan: WeightMap = {"wte.weight": one(e + "word_embeddings.weight"), "wpe.weight": one(e + "position_embeddings.weight")}
    if config.type_vocab_size:
        plan["wtt.weight"] = one(e + "token_type_embeddings.weight")
    _linear(plan, "embd_norm", e + "LayerNorm")
    for i in range(config.n_layer):
        ours, layer = f"blocks.{i}.", names.layer.format(i=i)
        for suffix in ("weight", "bias"):
            plan[ours + "attn.qkv." + suffix] = stacked(
                tuple(f"{layer}{part}.{suffix}" for part in (names.q, names.k, names.v)), (d, d, d))
        for mine, theirs in (("attn.proj", names.attn_out), ("norm1", names.norm1), ("mlp.fc", names.fc),
                             ("mlp.proj", names.mlp_out), ("norm2", names.norm2)):
            _linear(plan, ours + mine, layer + theirs)
    if config.pooler and config.task != "classify":
        _linear(plan, "pooler", names.pooler)
    if config.mlm_head:
        _linear(plan, "lm_transform.dense", names.mlm_dense)
        _linear(plan, "lm_transform.norm", names.mlm_norm)
        plan["lm_head.bias"] = one(names.mlm_bias)
        if not config.tie_embeddings:
            plan["lm_head.weight"] = one(names.mlm_decoder + ".weight")
    if config.task == "classify":  # ...ForSequenceClassification
        pooler, classifier = SEQUENCE_HEADS[hf["model_type"]]
        _linear(plan, "pooler", pooler)
        _linear(plan, "classifier", classifier)
    elif config.num_labels:  # BertForPreTraining's next-sentence head
        _linear(plan, "classifier", "cls.seq_relationship")
    return plan


def _encoder_common(config: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": config.vocab_size, "max_position_embeddings": config.block_size + config.position_offset,
            "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std}


def bert_from_config(config: ModelConfig) -> dict[str, Any]:
    out = {**_encoder_common(config), "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
           "num_attention_heads": config.n_head, "intermediate_size": config.ffn_dim,
           "hidden_act": _ACTIVATION_NAMES[config.mlp], "hidden_dropout_prob": config.dropout,
           "attention_probs_dropout_prob": config.dropout, "type_vocab_size": config.type_vocab_size,
           "layer_norm_eps": config.norm_eps, "position_embedding_type": "absolute", "is_decoder": False}
    if config.position_offset:  # RoBERTa: its padding_idx is the pad token's id, one below the first position
        out["pad_token_id"] = config.position_offset - 1
    return out


def distilbert_from_config(config: ModelConfig) -> dict[str, Any]:
    return {**_encoder_common(config), "dim": config.n_embd, "n_layers": config.n_layer, "n_heads": config.n_head,
            "hidden_dim": config.ffn_dim, "activation": _ACTIVATION_NAMES[config.mlp], "dropout": config.dropout,
            "attention_dropout": config.dropout, "sinusoidal_pos_embds": False}


def _encoder_class(base: str) -> Callable[[ModelConfig], str]:
    def architecture(config: ModelConfig) -> str:
        if config.mlm_head:
            return f"{base}ForPreTraining" if config.num_labels else f"{base}ForMaskedLM"
        return f"{base}Model"

    return architecture


# tensors encoder files carry that are not weights of ours: buffers, and the tied decoder's copies
_ENCODER_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "predictions.decoder.weight",
                    "predictions.decoder.bias", "lm_head.decoder.weight", "lm_head.decoder.bias",
                    "vocab_projector.weight")


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", "transformer.", gpt2_to_config, gpt_plan, gpt2_from_config,
                   ignored=(".attn.bias", ".attn.masked_bias")),
    "gpt_neo": Family("gpt_neo", "GPTNeoForCausalLM", "transformer.", neo_to_config, gpt_plan, neo_from_config,
                      ignored=(".attention.bias", ".attention.masked_bias")),
    **{kind: Family(kind, arch, "model.", llama_to_config, llama_plan, _llama_from_config(kind),
                    ignored=("rotary_emb.inv_freq",))
       for kind, arch in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                          ("qwen2", "Qwen2ForCausalLM"))},
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "model.", qwen3_to_config, llama_plan, _llama_from_config("qwen3")),
    "gemma3_text": Family("gemma3_text", "Gemma3ForCausalLM", "model.", gemma3_to_config, llama_plan,
                          gemma3_from_config),
    # exported as Llama or Mistral, which compute the same: no from_config
    "phi3": Family("phi3", "Phi3ForCausalLM", "model.", phi3_to_config, llama_plan, None),
    "bert": Family("bert", "BertForMaskedLM", "bert.", bert_to_config, encoder_plan, bert_from_config,
                   ignored=_ENCODER_IGNORED, top_level=("cls.", "classifier."), heads=encoder_heads,
                   architecture_of=_encoder_class("Bert")),
    "roberta": Family("roberta", "RobertaForMaskedLM", "roberta.", bert_to_config, encoder_plan, bert_from_config,
                      ignored=_ENCODER_IGNORED, top_level=("lm_head.", "classifier."), heads=encoder_heads,
                      architecture_of=_encoder_class("Roberta")),
    "distilbert": Family("distilbert", "DistilBertForMaskedLM", "distilbert.", distilbert_to_config, encoder_plan,
                         distilbert_from_config, ignored=_ENCODER_IGNORED,
                         top_level=("vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "pre_classifier.",
                                    "classifier."), heads=encoder_heads,
                         architecture_of=_encoder_class("DistilBert")),
}
# model types chatforge knows and refuses, with what to pick instead
REFUSED = {
    "gemma3": "is a Gemma 3 vision-language checkpoint (Gemma3ForConditionalGeneration); chatforge reads the "
              "text-only Gemma 3 models (model_type gemma3_text, Gemma3ForCausalLM: gemma-3-270m, gemma-3-1b)",
}
SUPPORTED = tuple(FAMILIES)


# --- which family can hold a chatforge model --------------------------------------------------

def export_family(config: ModelConfig) -> Family:
    """The transformers architecture that computes exactly what `config` computes, or why none does."""
    def no(why: str) -> ChatforgeError:
        return ChatforgeError(f"cannot export to Hugging Face format: {why}")

    if not config.causal:
        return _encoder_export(config, no)
    if config.post_norm:
        raise no("post_norm in a causal model: transformers' causal LMs normalise before each branch")
    if config.mlm_head:
        raise no("a masked-LM head (mlm_head) on a causal model")
    if config.type_vocab_size:
        raise no("segment embeddings (type_vocab_size) have no transformers causal-LM equivalent")
    if config.embd_norm:
        raise no("a norm after the embeddings (embd_norm) has no transformers causal-LM equivalent")
    if config.pos_encoding == "sinusoidal":
        raise no("sinusoidal positions have no transformers equivalent; use learned or rope positions")
    if config.pos_encoding == "none":
        raise no("pos_encoding='none' has no transformers equivalent; use learned or rope positions")
    qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
    windowed = [i for i in range(config.n_layer) if config.layer_window(i)]
    if config.pos_encoding == "rope":
        if config.norm != "rmsnorm":
            raise no(f"rope with norm={config.norm!r}: Llama-style models use rmsnorm")
        gemma = {"mlp='geglu_tanh'": config.mlp == "geglu_tanh", "sandwich_norm": config.sandwich_norm,
                 "norm_plus_one": config.norm_plus_one, "embd_scale": config.embd_scale is not None}
        if any(gemma.values()):
            return _gemma3_export(config, gemma, qkv_bias, no)
        if config.mlp != "swiglu":
            raise no(f"rope with mlp={config.mlp!r}: Llama-style models use swiglu")
        if config.attn_scale is not None and not math.isclose(config.attn_scale, config.dim_head ** -0.5):
            raise no(f"attn_scale={config.attn_scale}: Llama-style models scale by 1/sqrt(head_dim)")
        local_rope = config.rope_local_theta is not None and (config.rope_local_theta != config.rope_theta
                                                              or config.rope_scaling is not None)
        if windowed and local_rope:
            raise no("rope_local_theta: of the Llama-style models only Gemma 3 gives its sliding-window layers "
                     "a rotary of their own")
        if config.qk_norm:  # Qwen3: its attention_bias would put biases on q, k, v and o, but never on the MLP
            if config.bias or qkv_bias:
                raise no("qk_norm with biases (bias, qkv_bias): Qwen3, the Llama-style model with q/k norms, has none")
            return FAMILIES["qwen3"]
        if config.bias and not qkv_bias:
            raise no("bias=True with qkv_bias=False: Llama's attention_bias covers q, k, v and o together")
        if windowed:
            if len(windowed) != config.n_layer:
                raise no("a sliding window on only some layers (local_layers) of a rope model without qk_norm")
            if qkv_bias:
                raise no("a sliding window together with biases (Mistral has none)")
            return FAMILIES["mistral"]
        return FAMILIES["qwen2" if qkv_bias and not config.bias else "llama"]
    for option, used in (("qk_norm", config.qk_norm), ("sandwich_norm", config.sandwich_norm),
                         ("embd_scale", config.embd_scale is not None),
                         (f"mlp={config.mlp!r}", config.mlp in ("swiglu", "geglu_tanh"))):
        if used:
            raise no(f"learned positions with {option}: GPT-2 and GPT-Neo have none (rope models may)")
    # learned positions: GPT-2 or GPT-Neo
    if config.norm != "layernorm":
        raise no(f"learned positions with norm={config.norm!r}: GPT-2 and GPT-Neo use layernorm")
    if not config.bias:
        raise no("learned positions with bias=False: GPT-2 and GPT-Neo have biases")
    if config.kv_heads != config.n_head:
        raise no("grouped-query attention (n_kv_head) with learned positions: GPT-2 and GPT-Neo have none")
    if config.dim_head * config.n_head != config.n_embd:
        raise no("head_dim * n_head != n_embd: GPT-2 and GPT-Neo need n_embd // n_head")
    if not qkv_bias or windowed:
        if qkv_bias:
            raise no("a sliding window with q/k/v biases: GPT-Neo, the GPT family with windows, has none")
        if config.attn_scale != 1.0:
            raise no("qkv_bias=False needs GPT-Neo's unscaled attention (attn_scale=1.0)")
        return FAMILIES["gpt_neo"]
    if config.attn_scale not in (None, 1.0) and not math.isclose(config.attn_scale, config.dim_head ** -0.5):
        raise no(f"attn_scale={config.attn_scale}: GPT-2 scales by 1/sqrt(head_dim) or not at all")
    return FAMILIES["gpt2"]


def _gemma3_export(config: ModelConfig, gemma: dict[str, bool], qkv_bias: bool,
                   no: Callable[[str], ChatforgeError]) -> Family:
    """Gemma 3 text, the one transformers architecture with any of its options: it needs all of them."""
    missing = [name for name, used in {**gemma, "qk_norm": config.qk_norm}.items() if not used]
    if missing:
        present = ", ".join(name for name, used in gemma.items() if used)
        raise no(f"{present} without {', '.join(missing)}: Gemma 3, the transformers model with "
                 f"{'that option' if present.count(',') == 0 else 'those options'}, has all of them")
    if not math.isclose(config.embd_scale, config.n_embd ** 0.5, rel_tol=1e-6):
        raise no(f"embd_scale={config.embd_scale}: Gemma 3 scales its embeddings by sqrt(n_embd) "
                 f"({config.n_embd ** 0.5:.6g})")
    if config.bias or qkv_bias:
        raise no("biases (bias, qkv_bias) in a Gemma 3-style model: Gemma 3 has none")
    scale = config.attn_scale if config.attn_scale is not None else config.dim_head ** -0.5
    scalar = round(scale ** -2)
    if scalar < 1 or not math.isclose(scale, scalar ** -0.5, rel_tol=1e-6):
        raise no(f"attn_scale={config.attn_scale}: Gemma 3 scales by query_pre_attn_scalar ** -0.5 with a whole "
                 "number query_pre_attn_scalar")
    return FAMILIES["gemma3_text"]


def _encoder_export(config: ModelConfig, no: Callable[[str], ChatforgeError]) -> Family:
    """BERT, RoBERTa or DistilBERT: post-norm encoders with learned positions, biases and an embedding LayerNorm."""
    qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
    checks = {
        "pre-norm blocks (post_norm=False): BERT-family encoders normalise after each residual add; train "
                "with --post-norm": not config.post_norm,
        "no norm after the embeddings (embd_norm=False)": not config.embd_norm,
        f"pos_encoding={config.pos_encoding!r} (BERT-family encoders learn their positions)":
            config.pos_encoding != "learned",
        f"norm={config.norm!r} (BERT-family encoders use layernorm)": config.norm != "layernorm",
        "bias=False or qkv_bias=False (BERT-family encoders have biases everywhere)": not (config.bias and qkv_bias),
        "grouped-query attention (n_kv_head)": config.kv_heads != config.n_head,
        "head_dim * n_head != n_embd": config.dim_head * config.n_head != config.n_embd,
        f"attn_scale={config.attn_scale}": config.attn_scale is not None and not math.isclose(
            config.attn_scale, config.dim_head ** -0.5),
        f"mlp={config.mlp!r} (BERT-family encoders use gelu, gelu_tanh or relu)": config.mlp in ("swiglu",
                                                                                                 "geglu_tanh"),
        "sliding-window attention": config.sliding_window is not None,
        "qk_norm, sandwich_norm or embd_scale": config.qk_norm or config.sandwich_norm or config.embd_scale is not None,
        "a classifier (task='classify'): export the encoder it was fine-tuned from": config.task == "classify",
        "a masked-LM head without BERT's transform (train with --mlm-head for one transformers has)":
            config.task == "lm" and not config.mlm_head,
    }
    for why, bad in checks.items():
        if bad:
            raise no(f"encoder with {why}")
    nsp = bool(config.num_labels)
    if nsp and not (config.num_labels == 2 and config.pooler and config.pooling == "cls"):
        raise no("a sequence head other than BERT's next-sentence head (pooler + 2 labels over [CLS])")
    if config.position_offset:
        if nsp or not config.type_vocab_size:
            raise no("position_offset (RoBERTa) with a next-sentence head or without segment embeddings: RoBERTa "
                     "has segment embeddings and no next-sentence head")
        if config.mlm_head and config.mlp != "gelu":
            raise no(f"a RoBERTa-style (position_offset) masked-LM head with mlp={config.mlp!r}: RoBERTa's uses gelu")
        return FAMILIES["roberta"]
    if not config.type_vocab_size:
        if nsp or config.pooler or config.norm_eps != 1e-12:
            raise no("no segment embeddings (DistilBERT's layout) with a pooler, a next-sentence head or norm_eps "
                     f"{config.norm_eps} (DistilBERT has neither head, and norm_eps 1e-12)")
        return FAMILIES["distilbert"]
    return FAMILIES["bert"]


def architecture(family: Family, config: ModelConfig) -> str:
    """The transformers class a model of `config` is written as."""
    return family.architecture_of(config) if family.architecture_of is not None else family.architecture
