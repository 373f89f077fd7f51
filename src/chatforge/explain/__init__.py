"""Interpretability: see what a model attends to, which tokens it weighed, what each layer predicts.

    from chatforge.explain import explain_attention, explain_generation, logit_lens, attribute_text
"""
from chatforge.explain.attention import attention_maps, explain_attention
from chatforge.explain.attribution import attribute_text, input_attribution
from chatforge.explain.tokens import explain_generation, inspect_reply, logit_lens

__all__ = ["attention_maps", "explain_attention", "explain_generation", "inspect_reply", "logit_lens",
           "attribute_text", "input_attribution"]
