"""Freed host memory goes back to the system: the C heap's free pages after each CPU training step."""
import pytest
import torch

import coconut_engine.trainer as trainer_module
from coconut_engine.host_memory import can_release_host_memory, release_freed_host_memory
from coconut_engine.trainer import TrainConfig, Trainer


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not can_release_host_memory(), reason="needs glibc's malloc_trim (Linux)")
def test_freed_heap_pages_go_back_to_the_system():
    """Tensors under the mmap threshold live in the heap; freed between live ones, glibc keeps their
    pages (the heap cannot shrink past a live tensor) until they are released."""
    chunks, pins = [], []
    for _ in range(1500):  # 96 KiB each (141 MiB in all), each followed by a small live tensor
        chunks.append(torch.ones(24 * 1024))
        pins.append(torch.ones(256))
    del chunks
    before = resident_bytes()
    assert release_freed_host_memory()
    assert before - resident_bytes() > 64 * 2**20
    del pins


def test_the_trainer_releases_after_every_cpu_step_and_evaluation(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "release_freed_host_memory", lambda: calls.append(1) or True)
    cfg = TrainConfig(save_dir=str(tmp_path / "run"), model="builtin:gpt2-micro", task_train_size=40, task_val_size=4,
                      batch_size=16, num_epochs=2, mode="cot", eval_max_new_tokens=4, attention_backend="torch",
                      progress=False)
    Trainer(cfg).run()
    assert len(calls) == 2 * 3 + 2  # 3 steps per epoch, one evaluation per epoch
