"""Verbs of this area for the chatforge command (placeholder until filled in)."""


def register(sub) -> None:
    """Add this area's verbs to the `chatforge` parser."""
