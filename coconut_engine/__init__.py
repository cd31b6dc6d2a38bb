"""coconut-engine: train and serve continuous-thought (Coconut) language models on a paged KV cache."""
from .cache import AttentionBatch, PageAllocator, PagedKVCache
from .coconut import CoconutModel, CoconutSample, SpecialTokens, add_special_tokens
from .config import ModelConfig
from .errors import CheckpointError, CoconutEngineError, ConfigError, OutOfPagesError
from .generate import GenerationResult, Generator
from .loader import load_model, load_tokenizer, save_model
from .model import Decoder

__version__ = "0.1.0"

__all__ = [
    "AttentionBatch", "PageAllocator", "PagedKVCache", "CoconutModel", "CoconutSample", "SpecialTokens",
    "add_special_tokens", "ModelConfig", "CheckpointError", "CoconutEngineError", "ConfigError", "OutOfPagesError",
    "GenerationResult", "Generator", "load_model", "load_tokenizer", "save_model", "Decoder",
]
