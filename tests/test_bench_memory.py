"""The exact tensor-memory measurement of `coconut-engine bench train` on CPU."""
import torch

from coconut_engine.bench import peak_tensor_bytes

MB = 2**20


def floats(megabytes: int) -> torch.Tensor:
    return torch.ones(megabytes * MB // 4)


def test_peak_tensor_bytes_is_the_highest_live_level():
    kept = []

    def work():
        a, b = floats(4), floats(8)  # 12 MB live
        del a                        # 8
        c = floats(2)                # 10
        kept.append(b + c[:1])       # a new 8 MB while b and c live: 18, the peak (22 MB allocated in all)
        del b, c                     # 8

    peak = peak_tensor_bytes(work)
    assert 18 * MB <= peak < 18 * MB + MB // 2


def test_peak_tensor_bytes_is_relative_to_the_start():
    held = floats(16)  # allocated before the measured call: not part of its peak
    peak = peak_tensor_bytes(lambda: floats(1) + 1)  # two 1 MB tensors live at once
    assert 2 * MB <= peak < 2 * MB + MB // 2
    assert held.numel()
