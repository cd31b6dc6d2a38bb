"""Built-in task generators (official Coconut data format) and the task tokenizer."""
from . import prosqa_vocabulary
from .prosqa import ProsQAConfig, generate_prosqa, prosqa_statistics
from .tokenizer import train_task_tokenizer

__all__ = ["ProsQAConfig", "generate_prosqa", "prosqa_statistics", "prosqa_vocabulary", "train_task_tokenizer"]
