"""coconut-engine: train and serve continuous-thought (Coconut) language models on a paged KV cache."""
from .cache import AttentionBatch, PagedKVCache, PageAllocator
from .config import ModelConfig
from .errors import CheckpointError, CoconutEngineError, ConfigError, OutOfPagesError

__version__ = "0.1.0"

__all__ = [
    "AttentionBatch", "PagedKVCache", "PageAllocator", "ModelConfig",
    "CheckpointError", "CoconutEngineError", "ConfigError", "OutOfPagesError",
]
