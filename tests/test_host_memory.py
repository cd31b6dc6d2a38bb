"""Freed host memory goes back to the system: the C heap's free pages, once a CPU run's memory has grown."""
import os

import pytest
import torch

import coconut_engine.host_memory as host_memory
from coconut_engine.host_memory import (HostMemoryGuard, can_release_host_memory, release_freed_host_memory,
                                         resident_bytes)
from coconut_engine.trainer import TrainConfig, Trainer

OTHER_ALLOCATOR = "malloc" in os.environ.get("LD_PRELOAD", "")  # jemalloc / tcmalloc: not glibc's heap


@pytest.mark.skipif(not can_release_host_memory() or resident_bytes() is None or OTHER_ALLOCATOR,
                    reason="needs glibc's malloc (Linux) and /proc")
def test_freed_heap_pages_go_back_to_the_system():
    """Tensors far under the mmap threshold live in the heap; freed between live ones, glibc keeps their
    pages (the heap cannot shrink past a live tensor) until they are released."""
    chunks, pins = [], []
    for _ in range(6000):  # 24 KiB each (141 MiB in all), each followed by a small live tensor
        chunks.append(torch.ones(6 * 1024))
        pins.append(torch.ones(64))
    del chunks
    before = resident_bytes()
    assert release_freed_host_memory()
    assert before - resident_bytes() > 64 * 2**20
    del pins


def test_the_guard_trims_only_after_memory_grew_by_its_margin(monkeypatch):
    rss = {"now": 1000}
    trims = []
    monkeypatch.setattr(host_memory, "resident_bytes", lambda: rss["now"])
    monkeypatch.setattr(host_memory, "can_release_host_memory", lambda: True)

    def trim():  # gives back all but 700
        trims.append(rss["now"])
        rss["now"] = 700
        return True

    monkeypatch.setattr(host_memory, "release_freed_host_memory", trim)
    guard = HostMemoryGuard(margin_bytes=100)
    rss["now"] = 1099
    assert not guard.check() and trims == []
    rss["now"] = 1100
    assert guard.check() and trims == [1100] and guard.level == 700  # the level after the trim
    rss["now"] = 799
    assert not guard.check() and guard.trims == 1
    rss["now"] = 800
    assert guard.check() and guard.trims == 2


def test_without_malloc_trim_nothing_is_released(monkeypatch):
    monkeypatch.setattr(host_memory, "_MALLOC_TRIM", None)
    assert not can_release_host_memory() and not release_freed_host_memory()
    guard = HostMemoryGuard(margin_bytes=0)
    assert not guard.enabled and not guard.check()


def test_the_trainer_checks_after_every_cpu_step_and_evaluation_and_never_on_cuda(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HostMemoryGuard, "check", lambda self: calls.append(1) or False)
    cfg = TrainConfig(save_dir=str(tmp_path / "run"), model="builtin:gpt2-micro", task_train_size=40, task_val_size=4,
                      batch_size=16, num_epochs=2, mode="cot", eval_max_new_tokens=4, attention_backend="torch",
                      progress=False, device="cpu")
    trainer = Trainer(cfg)
    trainer.run()
    assert len(calls) == 2 * 3 + 2  # 3 steps per epoch, one evaluation per epoch
    trainer.device = torch.device("cuda")  # host memory is not what a GPU run grows
    trainer._release_host_memory()
    assert len(calls) == 8
