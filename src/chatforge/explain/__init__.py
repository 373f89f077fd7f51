"""Understand and choose: attention maps, token-level explanations, training reports, model sizing.

    from chatforge.explain import explain_attention, explain_generation, logit_lens, attribute_text, plan
"""
from .attention import attention_maps, explain_attention
from .attribution import attribute_text, input_attribution
from .plan import plan
from .report import detect_overfitting, write_report
from .tokens import explain_generation, inspect_reply, logit_lens

__all__ = ["attention_maps", "explain_attention", "explain_generation", "inspect_reply", "logit_lens",
           "attribute_text", "input_attribution", "write_report", "detect_overfitting", "plan"]
