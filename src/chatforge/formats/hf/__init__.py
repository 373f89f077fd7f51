"""Hugging Face interoperability: load GPT-2, GPT-Neo and Llama-family models onto chatforge's
own Transformer, from a directory or a Hub id (through the local cache), and export chatforge
models as directories transformers loads.

    model, tok = load_hf("path/to/hf-model", device="cpu", dtype=torch.bfloat16)
    model, tok = load_hf_id("EleutherAI/gpt-neo-1.3B")
    export_hf("runs/sft/best", "exported/")   # then AutoModelForCausalLM.from_pretrained("exported/")
"""
from chatforge.formats.hf.export import export_hf
from chatforge.formats.hf.families import SUPPORTED
from chatforge.formats.hf.read import hub_cache_dir, load_hf, load_hf_id, resolve_hub_id

__all__ = ["load_hf", "load_hf_id", "export_hf", "resolve_hub_id", "hub_cache_dir", "SUPPORTED"]
