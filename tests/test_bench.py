"""`coconut-engine bench train`'s measurements: exact tensor memory on CPU, interleaved timing."""
import pytest
import torch

from coconut_engine import bench
from coconut_engine.bench import bench_train, interleaved_stage_timing, peak_tensor_bytes

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


def test_interleaved_timing_times_every_mode_of_a_stage():
    times = interleaved_stage_timing("tiny", stage=2, modes=["paged", "multipass", "floor"], batch=3, reps=2,
                                     prompt_len=16)
    assert sorted(times) == ["floor", "multipass", "paged"] and all(t > 0 for t in times.values())


def test_bench_train_without_interleaving_times_each_point_in_its_own_process():
    rows = bench_train("tiny", stages=[1], modes=["paged", "floor"], batch=3, reps=1, prompt_len=16,
                       tensor_memory=False, interleave=False)
    assert [(r["mode"], r["timing"]) for r in rows] == [("paged", "own process"), ("floor", "own process")]
    assert all(r["median_ms"] > 0 and r["peak_mb"] > 0 and "tensor_mb" not in r for r in rows)


@pytest.mark.parametrize("tensor_memory,profiled", [("last", [6]), ("all", [0, 3, 6]), ("none", []), (True, [0, 3, 6])])
def test_bench_train_profiles_tensor_memory_at_the_stages_asked(tensor_memory, profiled, monkeypatch):
    """By default only the last stage's points get a tensor-memory process (one profiled point per mode,
    where a curriculum's memory peaks): the costliest process of a point, run for every stage before."""
    calls = []

    def fake_point(**kwargs):
        calls.append((kwargs.get("measure", "time"), kwargs["stage"], kwargs.get("mode")))
        if kwargs.get("measure") == "interleaved":
            return {mode: 1.0 for mode in kwargs["modes"]}
        if kwargs.get("measure") == "tensor_memory":
            return {"tensor_mb": 2.0, "tensor_step_mb": 1.0}
        return {"stage": kwargs["stage"], "mode": kwargs["mode"], "median_ms": 1.0, "peak_mb": 1.0, "tokens": 10}

    monkeypatch.setattr(bench, "run_train_point_subprocess", fake_point)
    rows = bench_train("tiny", stages=[0, 3, 6], modes=["paged", "floor"], tensor_memory=tensor_memory)
    assert sorted({stage for measure, stage, _ in calls if measure == "tensor_memory"}) == profiled
    assert [(r["stage"], "tensor_mb" in r) for r in rows] == [(s, s in profiled) for s in (0, 3, 6) for _ in range(2)]
    assert len([c for c in calls if c[0] == "tensor_memory"]) == 2 * len(profiled)
    with pytest.raises(ValueError, match="tensor_memory"):
        bench_train("tiny", stages=[0], modes=["paged"], tensor_memory="some")


def test_the_fork_server_preloads_every_shapes_transformers_model_module(monkeypatch):
    """Every point process forks from a server that has imported the transformers model module of every
    shape's family (a point importing it itself spent ~1.8 s of ~2 s there); one list whatever the
    first point, since a running server keeps the preload it started with."""
    import importlib
    import multiprocessing

    modules = bench.fork_server_preload()
    assert modules[:2] == ("coconut_engine.bench", "transformers")
    assert {"transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama",
            "transformers.models.qwen2.modeling_qwen2"} <= set(modules[2:])
    for module in modules:
        importlib.import_module(module)  # each exists
    started = []
    context = multiprocessing.get_context("forkserver")
    monkeypatch.setattr(type(context), "set_forkserver_preload", lambda self, names: started.append(names))
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: context)
    point = bench.run_train_point_subprocess(shape="tiny", mode="floor", stage=0, reps=1, prompt_len=16)
    assert started == [list(modules)] and point["mode"] == "floor"


def test_bench_decode_steps_times_equal_and_ragged_steps():
    rows = bench.bench_decode_steps("tiny", batches=[1, 3], prompt_len=20, steps=1, backend="torch")
    assert [(r["batch"], r["contender"]) for r in rows] == [
        (b, f"{who} {kind}") for b in (1, 3) for kind in ("equal", "ragged") for who in ("engine", "transformers")]
    assert all(r["median_ms"] > 0 and r["ms_per_token"] == r["median_ms"] / r["batch"] for r in rows)


def test_decode_steps_and_generation_bench_run_every_contender_in_the_asked_dtype():
    """A GPU serves in bf16: the transformers contender's cache and weights must follow the engine's dtype
    (its random K/V were fp32, so a bf16 model failed inside SDPA)."""
    rows = bench.bench_decode_steps("tiny", batches=[2], prompt_len=12, steps=1, backend="torch", dtype="bf16")
    assert len(rows) == 4 and all(r["median_ms"] > 0 and r["dtype"] == "bfloat16" for r in rows)
    rows = bench.bench_generate("tiny", batch=2, prompt_len=8, new_tokens=3, thoughts=2, thought_new_tokens=2,
                                official_questions=1, backend="torch", reps=1, dtype=torch.bfloat16)
    assert [r["name"].split(" ")[0] for r in rows] == ["engine", "transformers", "engine", "official"]
    assert all(r["seconds"] > 0 and r["dtype"] == "bfloat16" for r in rows)
    assert bench.serving_dtype("cpu") == torch.float32 and bench.serving_dtype("cuda") == torch.bfloat16
    assert bench.serving_dtype("cuda", "float32") == torch.float32


def test_ragged_prompt_lengths_are_within_a_fifth_of_the_mean():
    lens = bench.prompt_lengths(64, 400, ragged=True)
    assert min(lens) >= 320 and max(lens) <= 480 and len(set(lens)) > 10
    assert bench.prompt_lengths(3, 400, ragged=False) == [400] * 3
