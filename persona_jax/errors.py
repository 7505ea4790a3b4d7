"""One exception type for mistakes a user can make.

Runners catch it and print its one-sentence message with a non-zero exit instead of a
traceback (see `persona_jax.pipeline.cli`).
"""


class PersonaError(ValueError):
    """A user-facing error: the message says what was wrong, where, and how to fix it."""
