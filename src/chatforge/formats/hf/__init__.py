"""Hugging Face interoperability, file layouts only: GPT-2, GPT-Neo and Llama-family directories
read onto chatforge's own Transformer (read), chatforge models written as directories transformers
loads (export), the family tables both use (families) and the Hub cache (hub).

Users go through the layer above: `chatforge.loader.load("path/or/owner-name")` reads a directory
or a Hub id, `chatforge.export.export_hf(model, "out/")` writes one.
"""
from chatforge.formats.hf.export import write_hf
from chatforge.formats.hf.families import SUPPORTED
from chatforge.formats.hf.hub import hub_cache_dir, offline, resolve_hub_id
from chatforge.formats.hf.read import read_hf

__all__ = ["read_hf", "write_hf", "resolve_hub_id", "hub_cache_dir", "offline", "SUPPORTED"]
