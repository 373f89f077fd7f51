"""`pipeline(task, model=...)`: the Hugging Face call users know, on chatforge's engine.

    generation.py  conversational and text-generation (the engine)
    encoders.py    fill-mask and text-classification (encoder models; imported only for those tasks)
    embeddings.py  feature-extraction and sentence-embedding (token vectors, one vector per text)
"""
from chatforge.pipelines.generation import pipeline

__all__ = ["pipeline"]
