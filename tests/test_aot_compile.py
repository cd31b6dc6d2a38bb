"""Every Triton kernel compiled ahead of time for sm_90a (and, in the slow matrix, sm_80) on a machine
without a GPU: compile errors, spills and shared memory (kernels/aot_check.py).

The default run compiles each kernel for bf16 and fp32 at head_dim 128 (the widest head_dim whose
kernels must not spill), the bf16 backward at head_dim 80 and the bf16 attention-dropout variants of
the training kernels, in one subprocess per session; Triton's cache under build/ keeps compiled
variants between runs. `-m slow` adds the whole matrix for both targets.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from coconut_engine.kernels.aot_check import SHARED_LIMIT, Variant, check_in_subprocess, default_variants, full_variants

CACHE = Path(__file__).resolve().parents[1] / "build" / "triton-aot-cache"
KERNELS = {"_paged_attention_fwd_kernel", "_merge_splits_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
           "_bwd_one_token_kernel", "_store_kv_kernel"}
LIMIT = {f"sm_{c}{'a' if c == 90 else ''}": SHARED_LIMIT[c] for c in SHARED_LIMIT}


TOO_WIDE = Variant("extend", "bf16", head_dim=512)  # the wrapper rejects it before compiling


@pytest.fixture(scope="session")
def default_run():
    """The default variants, and one the check must report as failed, compiled in one subprocess."""
    kernels, results = check_in_subprocess(default_variants() + [TOO_WIDE], (90,), cache_dir=CACHE)
    return kernels, [r for r in results if r["variant"]["head_dim"] != 512], results[-1]


def launched(kernels, results, **match):
    """(variant, kernel) pairs of the results whose variant has the given fields."""
    return [(r["variant"], kernels[i]) for r in results if all(r["variant"][k] == v for k, v in match.items())
            for i in r["launched"]]


def assert_no_errors(results):
    errors = [(r["arch"], r["variant"], r["error"]) for r in results if r["error"]]
    assert not errors, errors[0]


def assert_resources(kernels, results):
    """No spills in a bf16/fp16 kernel at head_dim <= 128 (nor in a fp32 kernel on TF32 dots), and every
    kernel within its target's shared memory."""
    for variant, k in launched(kernels, results):
        assert k["shared_bytes"] <= LIMIT[k["arch"]], (variant, k)
        if variant["head_dim"] <= 128 and (variant["dtype"] != "fp32" or not variant["ieee"]):
            assert k["spill_bytes"] == 0, (variant, k)


def test_every_kernel_compiles_for_sm90a_in_bf16_and_fp32(default_run):
    kernels, results, _ = default_run
    assert_no_errors(results)
    for dtype in ("bf16", "fp32"):
        names = {k["kernel"] for _, k in launched(kernels, results, dtype=dtype)}
        assert names == KERNELS, (dtype, KERNELS - names)
    assert {k["arch"] for k in kernels} == {"sm_90a"}


def test_no_spills_and_shared_memory_within_the_limit(default_run):
    """Also fp32 inputs, which run TF32 dots with their own tiles (exact IEEE dots spilled 16 KB per thread)."""
    assert_resources(*default_run[:2])


def test_a_new_split_count_compiles_nothing(default_run):
    kernels, results, _ = default_run
    first, second = [r for r in results if r["variant"]["op"] == "decode-split" and r["variant"]["dtype"] == "bf16"
                     and not r["variant"]["dropout"]]
    assert (first["variant"]["splits"], second["variant"]["splits"]) == (4, 7)
    assert second["compiled"] == [] and second["launched"] == first["launched"]


def test_dkdv_runs_eight_warps_without_spills_from_head_dim_80(default_run):
    kernels, results, _ = default_run
    dkdv = {v["head_dim"]: k for v, k in launched(kernels, results, op="backward", dtype="bf16")
            if k["kernel"] == "_bwd_dkdv_kernel"}
    assert set(dkdv) == {80, 128}, dkdv
    assert all(k["num_warps"] == 8 and k["spill_bytes"] == 0 for k in dkdv.values()), dkdv


def test_attention_dropout_variants_compile_without_spills(default_run):
    """Every training kernel has a dropout variant (DROPOUT constexpr on) that compiles for sm_90a within
    the resources (the split thought step's merge has no dropout code); without dropout the kernels are
    compiled with the dropout code left out."""
    kernels, results, _ = default_run
    dropping = launched(kernels, results, dropout=True)
    names = {k["kernel"] for _, k in dropping}
    assert names == {"_paged_attention_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_one_token_kernel",
                     "_merge_splits_kernel"}
    assert all(k["constants"]["DROPOUT"] for _, k in dropping if k["kernel"] != "_merge_splits_kernel")
    assert not any(k["constants"].get("DROPOUT") for _, k in launched(kernels, results, dropout=False))
    assert_resources(kernels, [r for r in results if r["variant"]["dropout"]])


def test_the_thought_step_forward_with_dropout_compiles(default_run):
    """A training thought step is a one-token forward that stores the log-sum-exp (for its backward), on
    the decode tiles and split across programs; with attention dropout that is its own kernel variant
    (DROPOUT and STORE_LSE on, BLOCK_M of the kv group), compiled here like the extend one."""
    kernels, results, _ = default_run
    step = [(v, k) for v, k in launched(kernels, results, dropout=True, op="decode-split")
            if k["kernel"] == "_paged_attention_fwd_kernel"]
    assert step and all(k["constants"]["DROPOUT"] and k["constants"]["STORE_LSE"] for _, k in step), step
    extend = [k for _, k in launched(kernels, results, dropout=True, op="extend")]
    assert {k["constants"]["BLOCK_M"] for _, k in step}.isdisjoint({k["constants"]["BLOCK_M"] for k in extend})
    assert {k["kernel"] for _, k in launched(kernels, results, dropout=True, op="decode-split")} == {
        "_paged_attention_fwd_kernel", "_merge_splits_kernel"}
    assert_resources(kernels, [r for r in results if r["variant"]["dropout"]])


def test_a_failing_variant_is_reported_with_its_error(default_run):
    """The check reports, it does not hide: head_dim 512 is rejected by the wrapper before compiling."""
    too_wide = default_run[2]
    assert too_wide["variant"]["head_dim"] == 512 and "head_dim 512 > 256" in too_wide["error"]


@pytest.mark.parametrize("returncode,stdout", [(0, ""), (1, '{"kernels": [], "results": []}')])
def test_a_subprocess_without_an_answer_is_a_clear_error(monkeypatch, returncode, stdout):
    """A check process that dies (or prints nothing) reports its exit status and stderr, not an IndexError."""
    import subprocess

    from coconut_engine.kernels import aot_check

    monkeypatch.setattr(aot_check.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], returncode, stdout, "ptxas fatal: something"))
    with pytest.raises(RuntimeError, match=rf"exit {returncode}.*\n.*ptxas fatal"):
        check_in_subprocess([Variant("store_kv", "bf16")])


@pytest.mark.slow
def test_full_matrix_for_sm90a_and_sm80():
    kernels, results = check_in_subprocess(full_variants(), (90, 80), cache_dir=CACHE, timeout=7200)
    assert_no_errors(results)
    assert_resources(kernels, results)
