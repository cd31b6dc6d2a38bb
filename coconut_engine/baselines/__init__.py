"""What users would otherwise run: the official Coconut algorithm on transformers (speed, memory
and parity baseline for the engine)."""
from .official_hf import OfficialCoconutHF, hf_gradients_by_engine_name

__all__ = ["OfficialCoconutHF", "hf_gradients_by_engine_name"]
