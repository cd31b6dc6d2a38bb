"""Triton kernels of coconut-engine (installed as `coconut_engine.kernels`).

- `store_kv`: write new tokens' K/V into the page pools.
- `paged_attention`: varlen causal GQA attention over the pages (extend and split-KV decode).
- `reference`: the same operations as plain PyTorch loops: the test oracle.
- `torch_backend`: the same contract vectorised in PyTorch (fused flash kernels on CPU): the "torch" backend.

Importing this package does not import Triton; the kernels load on first use.
"""
from . import reference

__all__ = ["reference", "store_kv", "paged_attention"]


def __getattr__(name):
    if name == "store_kv":
        from .store_kv import store_kv

        return store_kv
    if name == "paged_attention":
        from .paged_attention import paged_attention

        return paged_attention
    raise AttributeError(name)
