"""chatforge model -> a directory transformers' AutoModelForCausalLM (AutoModelForMaskedLM, AutoModel
for encoders) and AutoTokenizer load.

The same family tables that load Hugging Face models run backwards here: our fused
tensors are split (qkv -> q, k, v; fc -> gate, up) and GPT-2's Conv1D weights transposed.
An encoder without an LM head (task="features") also gets sentence-transformers' modules.json
and pooling config, so sentence-transformers embeds with it as chatforge does.
A configuration no transformers architecture computes exactly is refused, naming the option.
Part of formats/ (file layouts only): it writes a model already in memory; `chatforge.export`
(`export_hf`, the `chatforge export` verb) loads one by name first and calls `write_hf`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from chatforge.formats.hf.families import WeightMap, architecture, export_family
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.utils import atomic_directory, dtype_name


def hf_state(model: Transformer, plan: WeightMap, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Our tensors under Hugging Face names and layouts, in `dtype` (default: as they are)."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, src in plan.items():
        if not src.names:  # only loading fills a missing bias with zeros; export plans never have one
            raise AssertionError(f"export plan has no Hugging Face tensor for {name}")
        tensor = ours[name].detach().to("cpu", dtype or ours[name].dtype)
        parts = tensor.split(list(src.sizes)) if src.sizes else [tensor]
        for hf_name, part in zip(src.names, parts):
            out[hf_name] = (part.T if src.transpose else part).contiguous()
    return out


def hf_config(model: Transformer, tokenizer: Optional[Tokenizer], dtype: torch.dtype) -> dict[str, Any]:
    """The config.json transformers needs for `model` saved in `dtype` (refuses what it cannot run)."""
    config = model.config
    family = export_family(config)
    dtype = dtype_name(dtype)
    out = {"architectures": [architecture(family, config)], "model_type": family.model_type,
           **family.from_config(config), "torch_dtype": dtype, "dtype": dtype, "use_cache": config.causal}
    if tokenizer is not None:
        for role in ("bos", "eos", "pad"):  # RoBERTa's pad id is its padding_idx: from_config's stays
            out.setdefault(f"{role}_token_id", tokenizer.token_id(role))
    return out


def sentence_transformers_files(model: Transformer) -> dict[str, dict]:
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json of an encoder without an LM head:
    sentence-transformers then pools (and normalises) its token vectors as chatforge's embeddings do."""
    config = model.config
    if config.causal or config.task != "features":
        return {}
    st = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"}]
    if config.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"})
    modes = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "last": "lasttoken"}
    pooling = {"word_embedding_dimension": config.n_embd,
               **{f"pooling_mode_{mode}": config.pooling == ours for ours, mode in modes.items()}}
    return {"modules.json": modules, "1_Pooling/config.json": pooling,
            "sentence_bert_config.json": {"max_seq_length": config.embed_max_len or config.block_size,
                                          "do_lower_case": False}}


def write_hf(model: Transformer, out_dir: str | Path, tokenizer: Optional[Tokenizer] = None,
             dtype: Optional[torch.dtype] = None) -> Path:
    """Write `model` as a Hugging Face model directory, atomically, in `dtype` (default: the model's own).

    The directory holds config.json, generation_config.json, model.safetensors and, with a
    tokenizer, tokenizer.json + tokenizer_config.json (chat template included).
    """
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    dtype = dtype or next(model.parameters()).dtype
    config = hf_config(model, tokenizer, dtype)  # refuses unsupported options before anything is written
    family = export_family(model.config)
    tensors = hf_state(model, family.plan(model.config, config), dtype)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, data in sentence_transformers_files(model).items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    return Path(out_dir)


__all__ = ["write_hf", "hf_config", "hf_state"]
