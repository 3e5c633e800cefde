"""Errors a user can cause, in a module without heavy imports (the CLI catches them cheaply)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


class TokenizerError(RuntimeError):
    """Tokenizer files that are missing or unreadable; the message names the file."""


class GenerationFailed(RuntimeError):
    """A request that the engine ended with an error (its settings left nothing to sample, NaN scores): the
    message says why. Other requests of the batch are unaffected."""


class GPT2LabWarning(UserWarning):
    """A warning of gpt2lab's about the user's input (the command line shows it as one line)."""
