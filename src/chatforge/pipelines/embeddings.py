"""Sentence embeddings: `pipeline("feature-extraction")` (a vector per token) and
`pipeline("sentence-embedding")` (one vector per text), as transformers and sentence-transformers give them.

    from chatforge import pipeline
    embed = pipeline("sentence-embedding", model="all-minilm-l6-v2")   # the catalogue's MiniLM, pulled once
    vectors = embed(["A cat sits on the mat.", "A dog runs."])         # numpy (2, 384), unit length
    tokens = pipeline("feature-extraction", model="all-minilm-l6-v2")
    tokens("A cat sits.")                                              # [[[384 floats] per token]]

How token vectors become one is the model's: a sentence-transformers directory says it in modules.json
and 1_Pooling/config.json (CLS, mean or max over the real tokens, then unit length when a Normalize
module follows), which the loader reads into the config (pooling, normalize, embed_max_len). A plain
encoder pools as its config says ([CLS] for BERT's); a decoder by its last token. Texts are sorted by
length before they are batched, so a batch pads to similar lengths; results come back in input order.
The Embedder below is what both pipelines, `chatforge embed` and the server's /v1/embeddings share.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.data.text import pad_batch
from chatforge.errors import ChatforgeError
from chatforge.loader import load
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer

POOLINGS = ("cls", "mean", "max", "last")


class TextTooLong(ChatforgeError):
    """An input longer than the model reads, with truncation off (the server answers it 400)."""

    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(f"input {index} is {tokens} tokens long, but this model reads at most {limit} "
                         f"(special tokens included); shorten it")
        self.index, self.tokens, self.limit = index, tokens, limit


class Embedder:
    """Texts or token ids -> token vectors or one vector per text, in length-sorted batches.

    pooling: cls | mean | max | last (default: the model's config; "last" for a decoder whose config says
    cls, since a decoder's first token has seen nothing else). normalize: unit-length vectors (default:
    the config's). max_length: the longest input, special tokens included (default: the config's
    embed_max_len, else its context).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, batch_size: int = 32,
                 pooling: Optional[str] = None, normalize: Optional[bool] = None, max_length: Optional[int] = None):
        config = model.config
        if pooling is None:
            pooling = "last" if config.causal and config.pooling == "cls" else config.pooling
        if pooling not in POOLINGS:
            raise ChatforgeError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ChatforgeError(f"batch_size must be a positive integer, got {batch_size!r}")
        limit = config.embed_max_len or config.block_size
        if max_length is not None and not (isinstance(max_length, int) and 1 <= max_length <= config.block_size):
            raise ChatforgeError(f"max_length must be between 1 and the model's context ({config.block_size}), "
                                 f"got {max_length!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pooling, self.batch_size = pooling, batch_size
        self.normalize = config.normalize if normalize is None else bool(normalize)
        self.max_length = max_length or limit
        self.dimensions = config.n_embd
        self.device = next(model.parameters()).device
        cls, sep = tokenizer.token_id("cls"), tokenizer.token_id("sep")
        # an encoder reads [CLS] text [SEP], as it was trained (RoBERTa: <s> text </s>)
        self.wrap = (cls, sep) if not config.causal and cls is not None and sep is not None else None
        self.extra = 2 if self.wrap else 0  # special tokens around each input

    # --- inputs -------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (what `prepare` takes)."""
        return self.tokenizer.encode_batch(list(texts))

    def prepare(self, rows: Sequence[Sequence[int]], truncate: bool = True) -> list[list[int]]:
        """What the model reads for each row of token ids: wrapped in [CLS] ... [SEP] for an encoder, cut to
        max_length when `truncate` (the end goes, [SEP] stays), else TextTooLong for one that is too long."""
        out = []
        for i, ids in enumerate(rows):
            ids = list(ids)
            if len(ids) + self.extra > self.max_length:
                if not truncate:
                    raise TextTooLong(i, len(ids) + self.extra, self.max_length)
                ids = ids[:self.max_length - self.extra]
            out.append([self.wrap[0], *ids, self.wrap[1]] if self.wrap else ids)
        return out

    # --- the model ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _batches(self, rows: list[list[int]], progress: Optional[Callable[[int], None]]):
        """(indices, hidden states (B, T, C), attention mask (B, T)) per batch, longest rows first."""
        if any(not r for r in rows):
            raise ChatforgeError("an empty input has no tokens to embed")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ids = pad_batch([rows[i] for i in chunk], self.tokenizer.pad_id).to(self.device)
            mask = pad_batch([[1] * len(rows[i]) for i in chunk], 0).to(self.device)
            hidden = self.model(ids, attention_mask=mask, logits="none")
            yield chunk, hidden.float(), mask
            if progress is not None:
                progress(len(chunk))

    def embed(self, rows: list[list[int]], progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """(len(rows), dimensions) float32 vectors of prepared rows, in their order."""
        out = np.zeros((len(rows), self.dimensions), dtype=np.float32)
        for chunk, hidden, mask in self._batches(rows, progress):
            vectors = self.model.pool(hidden, mask, self.pooling)
            if self.normalize:
                vectors = F.normalize(vectors, p=2, dim=-1)
            out[chunk] = vectors.cpu().numpy()
        return out

    def token_vectors(self, rows: list[list[int]]) -> list[np.ndarray]:
        """(tokens, dimensions) float32 vectors per prepared row, in their order."""
        out: list[Optional[np.ndarray]] = [None] * len(rows)
        for chunk, hidden, _ in self._batches(rows, None):
            for b, i in enumerate(chunk):
                out[i] = hidden[b, :len(rows[i])].cpu().numpy()
        return out  # type: ignore[return-value]


def _texts(inputs: Any, task: str) -> tuple[list[str], bool]:
    single = isinstance(inputs, str)
    texts = [inputs] if single else list(inputs) if isinstance(inputs, (list, tuple)) else None
    if not texts or any(not isinstance(t, str) for t in texts):
        raise ChatforgeError(f"{task} needs a text or a non-empty list of texts")
    return texts, single


class FeatureExtractionPipeline:
    """A vector per token, as transformers' feature-extraction pipeline gives them: for one text a list (of
    one) of lists per token of floats; for a list of texts, one such list per text."""

    def __init__(self, embedder: Embedder, truncate: bool = True):
        self.embedder, self.truncate = embedder, truncate

    def __repr__(self) -> str:
        return f"FeatureExtractionPipeline(dimensions={self.embedder.dimensions})"

    def __call__(self, inputs: Union[str, Sequence[str]], return_tensors: bool = False) -> Any:
        """return_tensors=True gives a (1, tokens, dimensions) torch tensor per text instead of lists."""
        texts, single = _texts(inputs, "feature-extraction")
        rows = self.embedder.prepare(self.embedder.encode(texts), truncate=self.truncate)
        vectors = [v[None] for v in self.embedder.token_vectors(rows)]
        out = [torch.from_numpy(v) if return_tensors else v.tolist() for v in vectors]
        return out[0] if single else out


class SentenceEmbeddingPipeline:
    """One vector per text, as sentence-transformers' encode gives them: a (dimensions,) array for one text,
    (texts, dimensions) for a list; output="list" gives plain lists of floats."""

    def __init__(self, embedder: Embedder, truncate: bool = True):
        self.embedder, self.truncate = embedder, truncate

    def __repr__(self) -> str:
        e = self.embedder
        return (f"SentenceEmbeddingPipeline(dimensions={e.dimensions}, pooling={e.pooling!r}, "
                f"normalize={e.normalize}, max_length={e.max_length})")

    def __call__(self, inputs: Union[str, Sequence[str]], output: str = "numpy",
                 progress: Optional[Callable[[int], None]] = None) -> Any:
        if output not in ("numpy", "list"):
            raise ChatforgeError(f"output must be 'numpy' or 'list', got {output!r}")
        texts, single = _texts(inputs, "sentence-embedding")
        rows = self.embedder.prepare(self.embedder.encode(texts), truncate=self.truncate)
        vectors = self.embedder.embed(rows, progress)
        result = vectors[0] if single else vectors
        return result.tolist() if output == "list" else result


def embedder(model: Optional[str] = None, *, device: str = "auto", dtype: Optional[str] = None,
             batch_size: int = 32, pooling: Optional[str] = None, normalize: Optional[bool] = None,
             max_length: Optional[int] = None) -> Embedder:
    """An Embedder for a model name or path (anything `chatforge.load` reads)."""
    model_obj, tokenizer = load(model, device=device, dtype=dtype)
    return Embedder(model_obj, tokenizer, batch_size=batch_size, pooling=pooling, normalize=normalize,
                    max_length=max_length)


def feature_extraction(model: Optional[str] = None, *, device: str = "auto", dtype: Optional[str] = None,
                       batch_size: int = 32, max_length: Optional[int] = None,
                       truncate: bool = True) -> FeatureExtractionPipeline:
    return FeatureExtractionPipeline(embedder(model, device=device, dtype=dtype, batch_size=batch_size,
                                              max_length=max_length), truncate)


def sentence_embedding(model: Optional[str] = None, *, device: str = "auto", dtype: Optional[str] = None,
                       batch_size: int = 32, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                       max_length: Optional[int] = None, truncate: bool = True) -> SentenceEmbeddingPipeline:
    """truncate=False refuses a text longer than max_length (TextTooLong) instead of cutting it, as
    sentence-transformers would."""
    return SentenceEmbeddingPipeline(embedder(model, device=device, dtype=dtype, batch_size=batch_size,
                                              pooling=pooling, normalize=normalize, max_length=max_length), truncate)


PIPELINES = {"feature-extraction": feature_extraction, "sentence-embedding": sentence_embedding}

__all__ = ["Embedder", "TextTooLong", "FeatureExtractionPipeline", "SentenceEmbeddingPipeline", "embedder",
           "feature_extraction", "sentence_embedding", "PIPELINES", "POOLINGS"]
