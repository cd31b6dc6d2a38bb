"""Exception types of coconut-engine: every error a user can cause names what was wrong and where."""


class CoconutEngineError(Exception):
    """Base class of every error raised on purpose by coconut-engine."""


class CheckpointError(CoconutEngineError, ValueError):
    """A model directory, config or safetensors file cannot be loaded or saved as asked.

    The message names the file and, where one is involved, the tensor.
    """


class ConfigError(CheckpointError):
    """A config.json describes a model that this engine does not implement (or implements differently)."""


class OutOfPagesError(CoconutEngineError, RuntimeError):
    """The paged KV cache has too few free pages for a request; nothing was allocated or written."""


class InvalidArgumentError(CoconutEngineError, ValueError):
    """A function or command-line argument is of the wrong type or out of range; the message names it."""


class KernelInputError(InvalidArgumentError):
    """A tensor handed to a kernel wrapper has the wrong dtype, device or layout; the message names it."""
