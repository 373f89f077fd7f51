"""Encoder pipelines: `pipeline("fill-mask")` and `pipeline("text-classification")`, Hugging Face style.

    from chatforge import pipeline
    unmask = pipeline("fill-mask", model="runs/bert/best")
    unmask("The cat sat on the [MASK].")   # [{"score", "token", "token_str", "sequence"}, ...] best first
    spam = pipeline("text-classification", model="runs/sms/finetune/best")
    spam("WINNER!! Claim your prize now")  # [{"label": "spam", "score": 0.99}]

`pipeline.py` finds these in PIPELINES: task name -> factory(model, device=, dtype=, **defaults), together
with embeddings.py's feature-extraction and sentence-embedding.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import torch

from chatforge.errors import ChatforgeError
from chatforge.loader import load
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.data.tables import encode_examples
from chatforge.data.text import pad_batch, running_text
from chatforge.pipelines.embeddings import PIPELINES as EMBEDDING_PIPELINES


def check_fill_mask(model: Transformer, tokenizer: Tokenizer, name: str = "this model") -> None:
    """Refuse models that cannot fill in [MASK]: decoders, classifiers, tokenizers without [MASK]."""
    config = model.config
    if config.task == "classify":
        labels = ", ".join(config.labels or []) or f"{config.num_labels} labels"
        raise ChatforgeError(f"{name} is a text classifier ({labels}), not a masked language model; fill-mask "
                             "needs an encoder pre-trained with `chatforge pretrain --objective mlm`")
    if config.causal:
        raise ChatforgeError(f"{name} is a causal (left-to-right) language model; fill-mask needs a masked-LM "
                             "encoder (`chatforge pretrain --objective mlm`), or use text-generation")
    if config.task == "features":
        raise ChatforgeError(f"{name} is an encoder without a masked-LM head (its outputs are token vectors, as "
                             "BertModel's); fill-mask needs a checkpoint with one (BertForMaskedLM, "
                             "RobertaForMaskedLM), or use feature-extraction / sentence-embedding")
    if tokenizer.token_id("mask") is None:
        raise ChatforgeError(f"the tokenizer of {name} has no [MASK] token, so it cannot fill in masks")


def check_classifier(model: Transformer, name: str = "this model") -> None:
    if model.config.task != "classify" or not model.config.num_labels:
        raise ChatforgeError(f"{name} is not a text classifier (it has no label head); fine-tune one with "
                             "`chatforge finetune --task classify`")


class FillMaskPipeline:
    """Top-k tokens, with probabilities, for each [MASK] in the text."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, top_k: int = 5, name: str = "this model"):
        check_fill_mask(model, tokenizer, name)
        self.model, self.tokenizer, self.top_k = model.eval(), tokenizer, top_k
        self.mask_token = tokenizer.special["mask"]
        self.device = next(model.parameters()).device
        # byte-level BPE learned " word" tokens: the mask takes the space before it, as in training
        self._absorb_space = tokenizer.kind == "bpe"

    def __repr__(self) -> str:
        return f"FillMaskPipeline(params={self.model.num_params():,})"

    def encode(self, text: str) -> list[int]:
        if self.mask_token not in text:
            raise ChatforgeError(f"no {self.mask_token} in the input; write {self.mask_token} where a word is missing")
        if self._absorb_space:
            text = re.sub(r"\s+" + re.escape(self.mask_token), self.mask_token, running_text(text))
        pieces = text.split(self.mask_token)  # user text stays literal; only [MASK] is special
        mask, ids = self.tokenizer.token_id("mask"), []
        for i, piece in enumerate(pieces):
            if i:
                ids.append(mask)
            ids += self.tokenizer.encode(piece)
        limit = self.model.config.block_size - 2
        if len(ids) > limit:
            raise ChatforgeError(f"the text is {len(ids)} tokens long; this model reads at most {limit}")
        return [self.tokenizer.token_id("cls"), *ids, self.tokenizer.token_id("sep")]

    @torch.no_grad()
    def __call__(self, inputs: Union[str, Sequence[str]], top_k: Optional[int] = None) -> list:
        """For one text with one [MASK]: a list of {score, token, token_str, sequence}; with several masks,
        one such list per mask; for a list of texts, one result per text."""
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise ChatforgeError("fill-mask needs a text (or a list of texts) containing [MASK]")
        k = top_k or self.top_k
        rows = [self.encode(t) for t in texts]
        ids = pad_batch(rows, self.tokenizer.pad_id).to(self.device)
        attention = pad_batch([[1] * len(r) for r in rows], 0).to(self.device)
        logits = self.model(ids, attention_mask=attention).float()[..., :self.tokenizer.vocab_size]
        probs = logits.softmax(-1)
        ranked = probs.clone()
        ranked[..., sorted(self.tokenizer.special_ids)] = -1.0  # never propose [CLS], [MASK], ...
        results = []
        mask_id = self.tokenizer.token_id("mask")
        for b, row in enumerate(rows):
            per_mask = []
            for pos in [i for i, t in enumerate(row) if t == mask_id]:
                scores, tokens = ranked[b, pos].topk(min(k, ranked.shape[-1]))
                options = []
                for score, token in zip(scores.tolist(), tokens.tolist()):
                    filled = list(row)
                    filled[pos] = token
                    options.append({"score": score, "token": token,
                                    "token_str": self.tokenizer.decode([token]),
                                    "sequence": self.tokenizer.decode(filled[1:-1]).strip()})
                per_mask.append(options)
            results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return results[0] if single else results


class TextClassificationPipeline:
    """The label (and its probability) of each text, or of each {"text", "text_pair"}."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, top_k: Optional[int] = 1, batch_size: int = 32,
                 name: str = "this model"):
        check_classifier(model, name)
        self.model, self.tokenizer, self.top_k, self.batch_size = model.eval(), tokenizer, top_k, batch_size
        config = model.config
        self.labels = list(config.labels or [f"LABEL_{i}" for i in range(config.num_labels)])
        self.device = next(model.parameters()).device

    def __repr__(self) -> str:
        return f"TextClassificationPipeline(labels={self.labels}, params={self.model.num_params():,})"

    @torch.no_grad()
    def __call__(self, inputs: Union[str, dict, Sequence[Union[str, dict]]], top_k: Any = "default") -> list:
        """[{"label", "score"}] per text (the best label; top_k=None gives every label, best first)."""
        top_k = self.top_k if top_k == "default" else top_k
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else list(inputs)
        if not items:
            raise ChatforgeError("text-classification needs a text, a {'text', 'text_pair'} dict, or a list of them")
        texts, pairs = [], []
        for item in items:
            text, pair = (item, None) if isinstance(item, str) else (item.get("text"), item.get("text_pair"))
            if not isinstance(text, str) or not text.strip():
                raise ChatforgeError("text-classification needs non-empty texts")
            texts.append(text)
            pairs.append(pair)
        has_pairs = any(p is not None for p in pairs)
        encoded = encode_examples(self.tokenizer, self.model.config, texts,
                                  [p or "" for p in pairs] if has_pairs else None, self.model.config.block_size)
        probs = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            batch = {"input_ids": pad_batch([ids for ids, _ in chunk], self.tokenizer.pad_id),
                     "token_type_ids": pad_batch([seg for _, seg in chunk], 0),
                     "attention_mask": pad_batch([[1] * len(ids) for ids, _ in chunk], 0)}
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"], logits="classify")
            probs.extend(logits.float().softmax(-1).tolist())
        out = []
        for p in probs:
            ranked = sorted(zip(self.labels, p), key=lambda x: -x[1])
            ranked = [{"label": label, "score": score} for label, score in ranked]
            out.append(ranked[0] if top_k == 1 else ranked[:top_k] if top_k else ranked)
        return out[0] if single and top_k != 1 else out  # as transformers: one text, several labels: a flat list


def fill_mask(model: Optional[str] = None, *, device: str = "auto", dtype: Optional[str] = None,
              top_k: int = 5) -> FillMaskPipeline:
    model_obj, tokenizer = load(model, device=device, dtype=dtype)
    return FillMaskPipeline(model_obj, tokenizer, top_k=top_k, name=model or "the demo model")


def text_classification(model: Optional[str] = None, *, device: str = "auto", dtype: Optional[str] = None,
                        top_k: Optional[int] = 1, batch_size: int = 32) -> TextClassificationPipeline:
    model_obj, tokenizer = load(model, device=device, dtype=dtype)
    return TextClassificationPipeline(model_obj, tokenizer, top_k=top_k, batch_size=batch_size,
                                      name=model or "the demo model")


PIPELINES = {"fill-mask": fill_mask, "text-classification": text_classification,
             "sentiment-analysis": text_classification, **EMBEDDING_PIPELINES}
