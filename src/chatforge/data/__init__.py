"""Data pipeline: text files -> token shards on disk -> batches."""
from chatforge.data.shards import TokenShards, find_inputs, iter_train_text, load_meta, prepare_shards

__all__ = ["TokenShards", "find_inputs", "iter_train_text", "load_meta", "prepare_shards"]
