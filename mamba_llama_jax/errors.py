"""Project exceptions: each says what was wrong and how to fix it, so users never face a raw JAX traceback."""


class MambaLlamaError(Exception):
    """Base class of every error this project raises for a user mistake or bad input."""


class ConfigError(MambaLlamaError, ValueError):
    """A configuration file or value is invalid."""


class ModelFormatError(MambaLlamaError, ValueError):
    """A model file (GGUF, safetensors, config.json, pickle) is missing, corrupt or unsupported."""


class TokenizerError(MambaLlamaError, ValueError):
    """A tokenizer cannot be built from the given files or metadata."""


class CheckpointError(MambaLlamaError):
    """A training checkpoint is missing, incomplete or incompatible."""


class GenerationError(MambaLlamaError, ValueError):
    """A generation request cannot be served (prompt too long, bad sampling options, ...)."""


class KernelError(MambaLlamaError, ValueError):
    """Inputs that a kernel (or its reference) cannot take: wrong shapes, dtypes or tiling options."""


class DataError(MambaLlamaError, ValueError):
    """A dataset is missing, malformed or lacks the columns a stage needs."""


class TrainingError(MambaLlamaError, RuntimeError):
    """Training cannot go on (a non-finite loss, a mesh that does not fit the devices, ...)."""


class Preempted(TrainingError):
    """Training stopped on SIGTERM (what a preempted TPU/GPU VM receives) after saving a checkpoint."""
