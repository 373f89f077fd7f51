"""One exception type for every mistake a user can make.

The CLI prints a ChatforgeError on one line and exits non-zero; the server turns it
into a 4xx JSON error. Anything else escaping is a bug in chatforge.
"""


class ChatforgeError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class ConfigError(ChatforgeError):
    """An impossible or unknown configuration value."""


class CheckpointError(ChatforgeError):
    """A checkpoint directory that is missing, corrupt, foreign or inconsistent."""


class DataError(ChatforgeError):
    """Training or evaluation data that is missing, empty or malformed."""
