"""Hugging Face model families, mapped onto chatforge's one Transformer.

A family knows two things: how its config.json becomes a ModelConfig (and back), and
where each chatforge tensor lives in its state dict. That second part is one table, a
WeightMap {chatforge name: Source}, read in one direction to load (formats.hf.read) and in
the other to export (formats.hf.export), so the two can never disagree about a name or a
layout. Pure data and config mapping: no file is touched here (sizing uses it too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from chatforge.config import ModelConfig
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
    from_config: Callable[[ModelConfig], dict[str, Any]]
    ignored: tuple[str, ...] = ()  # suffixes of buffers some files carry that are not weights


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


def _rope_theta(hf: dict[str, Any]) -> float:
    """Plain RoPE only: rope_theta from either the transformers 4 or the transformers 5 spelling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise unsupported(hf, f"rope scaling {kind!r}")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise unsupported(hf, "partial rotary embeddings (partial_rotary_factor)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _windows(hf: dict[str, Any], n_layer: int) -> tuple[Optional[int], Optional[list[int]]]:
    """Sliding window and the layers that use it, from layer_types or the family's own switch."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise unsupported(hf, f"attention layer types {', '.join(unknown)}")
        local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif hf.get("model_type") == "mistral":
        local = list(range(n_layer))
    elif hf.get("model_type") == "qwen2" and hf.get("use_sliding_window"):
        local = list(range(hf.get("max_window_layers", 0), n_layer))
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


# --- Llama, Mistral, Qwen2 ---------------------------------------------------------------

def llama_to_config(hf: dict[str, Any]) -> ModelConfig:
    kind = hf.get("model_type")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise unsupported(hf, f"activation {act!r} (hidden_act); chatforge's SwiGLU uses silu")
    if kind == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif kind == "llama":
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    else:
        qkv_bias = o_bias = mlp_bias = False
    n_embd, n_head = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    n_layer = _need(hf, "num_hidden_layers")
    window, local = _windows(hf, n_layer)
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size"), block_size=_need(hf, "max_position_embeddings"), n_layer=n_layer,
        n_head=n_head, n_embd=n_embd, n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or n_embd // n_head, intermediate_size=_need(hf, "intermediate_size"),
        pos_encoding="rope", rope_theta=_rope_theta(hf), mlp="swiglu", norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        # one `bias` switch covers o_proj and the MLP: a layer that lacks one of them loads zeros there
        bias=o_bias or mlp_bias, qkv_bias=qkv_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False), sliding_window=window, local_layers=local)


def llama_plan(config: ModelConfig, hf: dict[str, Any]) -> WeightMap:
    kind = hf.get("model_type")
    qkv_bias = kind == "qwen2" or (kind == "llama" and bool(hf.get("attention_bias")))
    o_bias = kind == "llama" and bool(hf.get("attention_bias"))
    mlp_bias = kind == "llama" and bool(hf.get("mlp_bias"))
    plan: WeightMap = {"wte.weight": one("model.embed_tokens.weight"), "norm_f.weight": one("model.norm.weight")}
    q, kv, ffn = config.n_head * config.dim_head, config.kv_heads * config.dim_head, config.ffn_dim
    for i in range(config.n_layer):
        ours, a, m = f"blocks.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        plan[ours + "norm1.weight"] = one(f"model.layers.{i}.input_layernorm.weight")
        plan[ours + "norm2.weight"] = one(f"model.layers.{i}.post_attention_layernorm.weight")
        for suffix in ("weight", "bias") if qkv_bias else ("weight",):
            plan[ours + "attn.qkv." + suffix] = stacked(
                (f"{a}q_proj.{suffix}", f"{a}k_proj.{suffix}", f"{a}v_proj.{suffix}"), (q, kv, kv))
        plan[ours + "attn.proj.weight"] = one(a + "o_proj.weight")
        plan[ours + "mlp.fc.weight"] = stacked((m + "gate_proj.weight", m + "up_proj.weight"), (ffn, ffn))
        plan[ours + "mlp.proj.weight"] = one(m + "down_proj.weight")
        if config.bias:
            plan[ours + "attn.proj.bias"] = one(a + "o_proj.bias") if o_bias else ZEROS
            plan[ours + "mlp.fc.bias"] = (stacked((m + "gate_proj.bias", m + "up_proj.bias"), (ffn, ffn))
                                          if mlp_bias else ZEROS)
            plan[ours + "mlp.proj.bias"] = one(m + "down_proj.bias") if mlp_bias else ZEROS
    if not config.tie_embeddings:
        plan["lm_head.weight"] = one("lm_head.weight")
    return plan


def _llama_from_config(kind: str) -> Callable[[ModelConfig], dict[str, Any]]:
    def convert(config: ModelConfig) -> dict[str, Any]:
        out = {"vocab_size": config.vocab_size, "hidden_size": config.n_embd,
               "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layer,
               "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
               "head_dim": config.dim_head, "max_position_embeddings": config.block_size,
               "rms_norm_eps": config.norm_eps, "hidden_act": "silu", "rope_theta": config.rope_theta,
               "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
               "tie_word_embeddings": config.tie_embeddings, "attention_dropout": config.dropout,
               "initializer_range": config.init_std}
        if kind == "llama":
            out.update(attention_bias=config.bias, mlp_bias=config.bias)
        elif kind == "mistral":
            out["sliding_window"] = config.sliding_window
        else:
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
        return out

    return convert


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", "transformer.", gpt2_to_config, gpt_plan, gpt2_from_config,
                   ignored=(".attn.bias", ".attn.masked_bias")),
    "gpt_neo": Family("gpt_neo", "GPTNeoForCausalLM", "transformer.", neo_to_config, gpt_plan, neo_from_config,
                      ignored=(".attention.bias", ".attention.masked_bias")),
    **{kind: Family(kind, arch, "model.", llama_to_config, llama_plan, _llama_from_config(kind),
                    ignored=("rotary_emb.inv_freq",))
       for kind, arch in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                          ("qwen2", "Qwen2ForCausalLM"))},
}
SUPPORTED = tuple(FAMILIES)


# --- which family can hold a chatforge model --------------------------------------------------

def export_family(config: ModelConfig) -> Family:
    """The transformers architecture that computes exactly what `config` computes, or why none does."""
    def no(why: str) -> ChatforgeError:
        return ChatforgeError(f"cannot export to Hugging Face format: {why}")

    if not config.causal:
        raise no("causal=False (a bidirectional encoder) has no causal-LM equivalent in transformers")
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
        if config.mlp != "swiglu":
            raise no(f"rope with mlp={config.mlp!r}: Llama-style models use swiglu")
        if config.attn_scale is not None and not math.isclose(config.attn_scale, config.dim_head ** -0.5):
            raise no(f"attn_scale={config.attn_scale}: Llama-style models scale by 1/sqrt(head_dim)")
        if config.bias and not qkv_bias:
            raise no("bias=True with qkv_bias=False: Llama's attention_bias covers q, k, v and o together")
        if windowed:
            if len(windowed) != config.n_layer:
                raise no("a sliding window on only some layers (local_layers) of a rope model")
            if qkv_bias:
                raise no("a sliding window together with biases (Mistral has none)")
            return FAMILIES["mistral"]
        return FAMILIES["qwen2" if qkv_bias and not config.bias else "llama"]
    # learned positions: GPT-2 or GPT-Neo
    if config.norm != "layernorm":
        raise no(f"learned positions with norm={config.norm!r}: GPT-2 and GPT-Neo use layernorm")
    if config.mlp == "swiglu":
        raise no("learned positions with mlp='swiglu': GPT-2 and GPT-Neo use a GELU or ReLU MLP")
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
