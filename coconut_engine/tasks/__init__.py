"""Built-in task generators (official Coconut data format) and the task tokenizer."""
from .prosqa import ProsQAConfig, generate_prosqa, prosqa_statistics
from .tokenizer import train_task_tokenizer

__all__ = ["ProsQAConfig", "generate_prosqa", "prosqa_statistics", "train_task_tokenizer"]
