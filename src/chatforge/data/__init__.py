"""Data: files on disk -> what a model reads, for training and inference alike.

One module per kind of input: `shards` (text -> token shards for causal-LM blocks), `text`
(sentences, documents and the id layouts encoders read), `pairs` (sentence corpora for
masked-LM and next-sentence pairs), `chats` (chat JSONL -> packed rows with loss masks),
`tables` (labelled CSV/TSV/JSONL -> classification examples). This is the core layer: it
imports only errors, utils, config and the tokenizer, never chat/,
engine/, train/, the loader or formats/.

    from chatforge.data import TokenShards, prepare_shards
"""
from chatforge.data.shards import TokenShards, find_inputs, iter_train_text, load_meta, prepare_shards

__all__ = ["TokenShards", "find_inputs", "iter_train_text", "load_meta", "prepare_shards"]
