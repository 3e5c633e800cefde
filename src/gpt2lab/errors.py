"""Errors a user can cause, in a module without heavy imports (the CLI catches them cheaply)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


class TokenizerError(RuntimeError):
    """Tokenizer files that are missing or unreadable; the message names the file."""
