"""Ahead-of-time compile check: every kernel the wrappers launch, compiled for sm_90a and sm_80 without a GPU.

A stand-in Triton driver reports a CUDA target (`GPUTarget("cuda", 90, 32)` or 80) and replaces only
what needs a device: its launcher records the launch instead of running it, and its binary loader
reads the resources of the cubin that the Triton wheel's `ptxas` produced (`cuobjdump -res-usage`).
Then the real wrappers run on small CPU tensors, so every variant is compiled with exactly the
constexprs, launch options and argument specialisation a GPU launch would use, and Triton's own
shared-memory check runs against the target's limit.

Kernels must be defined while `TRITON_INTERPRET` is off, so `check_in_subprocess` runs the check in a
fresh interpreter (what tests and the CLI use); `python -m coconut_engine.kernels.aot_check` prints
the resource table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

# Shared memory per block that a kernel may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("prefill", "extend", "decode", "decode-split", "backward", "backward-one-token", "backward-one-token-split",
       "store_kv")


@dataclass(frozen=True)
class Variant:
    """One call of a kernel wrapper, as a model step makes it."""

    op: str  # one of OPS
    dtype: str  # bf16 | fp16 | fp32
    head_dim: int = 128
    group: int = 4  # query heads per kv head
    page_size: int = 16
    ieee: bool = False  # exact fp32 dots (what comparison tests ask for)
    splits: int = 4  # for the *-split ops
    dropout: bool = False  # attention-probability dropout (training forward and backward ops)


@dataclass
class CompiledKernel:
    """Resources of one compiled kernel (one specialisation) for one target."""

    arch: str
    kernel: str
    constants: dict
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_bytes: int = -1  # per-thread local memory (stack frame + local arrays): what spilled registers use
    shared_bytes: int = -1


@dataclass
class VariantResult:
    """What one variant launched: indices into the compiled kernels, and which of them it compiled."""

    variant: Variant
    arch: str
    launched: list[int] = field(default_factory=list)
    compiled: list[int] = field(default_factory=list)
    error: str | None = None


def arch_name(capability: int) -> str:
    """Triton's name of the target: sm_90a for Hopper (wgmma), sm_80 for Ampere."""
    return f"sm_{capability}{'a' if capability == 90 else ''}"


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes per thread, static shared bytes) of the only function in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = _RES_USAGE.search(report)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{report}")
    regs, stack, shared, local = (int(g) for g in match.groups())
    return regs, stack + local, shared


class _StandInUtils:
    def __init__(self, owner: "StandInDriver"):
        self.owner = owner

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_LIMIT[self.owner.capability], "multiprocessor_count": 132}

    def load_binary(self, name, cubin, shared, device):
        """What the CUDA driver reports for a loaded kernel: registers, spills (local bytes / 4), max threads."""
        row = self.owner.kernels[-1]
        row.registers, row.spill_bytes, _ = _resources(cubin)
        row.shared_bytes = shared
        # a module handle that is not None: Triton loads each kernel once
        return f"stand-in module {name}", 0, row.registers, row.spill_bytes // 4, 1024


class StandInDriver:
    """A Triton driver for a CUDA target that is not there: compiles for real, launches nothing."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)
        self.utils = _StandInUtils(self)
        self.kernels: list[CompiledKernel] = []
        self.launches: list[int] = []

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_device(self) -> int:
        return self.capability  # one Triton kernel cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def launcher_cls(self, src, metadata):
        """Called once per compiled kernel, right before `load_binary`; returns what a launch calls."""
        index = len(self.kernels)
        names = src.fn.arg_names
        constants = {names[key[0]] if isinstance(key, tuple) else key: value for key, value in src.constants.items()}
        self.kernels.append(CompiledKernel(
            arch=arch_name(self.capability), kernel=src.fn.__name__,
            constants={k: v for k, v in constants.items() if isinstance(v, (int, bool))},
            num_warps=metadata.num_warps, num_stages=metadata.num_stages))
        return lambda *args, **kwargs: self.launches.append(index)


def _call_wrapper(v: Variant, device: str = "cpu") -> None:
    """Run the wrapper(s) of `v` on small tensors shaped as a model step would shape them."""
    from coconut_engine.cache import AttentionBatch

    from .dropout import AttentionDropout
    from .paged_attention import paged_attention
    from .paged_attention_bwd import paged_attention_backward
    from .store_kv import store_kv

    dtype = _DTYPES[v.dtype]
    kv_heads = 2
    heads = kv_heads * v.group
    prefix, q_lens = {"prefill": ([0, 0], [40, 7]), "extend": ([30, 5], [9, 3]), "backward": ([30, 5], [9, 3])}.get(
        v.op, ([300, 40], [1, 1]))
    k_lens = [p + q for p, q in zip(prefix, q_lens)]
    pages = [-(-k // v.page_size) for k in k_lens]
    table = torch.zeros(len(k_lens), max(pages), dtype=torch.int32)
    for b, n in enumerate(pages):
        table[b, :n] = torch.arange(sum(pages[:b]), sum(pages[:b]) + n, dtype=torch.int32)
    pool = torch.zeros(sum(pages) + 1, v.page_size, kv_heads, v.head_dim, dtype=dtype)
    tokens = sum(q_lens)
    cu = torch.tensor([0] + [sum(q_lens[: b + 1]) for b in range(len(q_lens))], dtype=torch.int32)
    batch = AttentionBatch(cu.to(device), torch.tensor(k_lens, dtype=torch.int32, device=device), table.to(device),
                           torch.arange(tokens, dtype=torch.int64, device=device),
                           torch.arange(tokens, dtype=torch.int64, device=device),
                           max(q_lens), max(k_lens), tuple(q_lens), tuple(k_lens))
    pool = pool.to(device)
    q = torch.zeros(tokens, heads, v.head_dim, dtype=dtype, device=device)
    splits = v.splits if v.op.endswith("-split") else 1
    # a seed above 2**31 (an int32 argument bit-cast in the kernel), as half of the drawn seeds are
    dropout = AttentionDropout(0.1, 0xC0FFEE42, torch.arange(len(q_lens), dtype=torch.int32, device=device)) \
        if v.dropout else None
    if v.op == "store_kv":
        kv = torch.zeros(tokens, kv_heads, v.head_dim, dtype=dtype, device=device)
        store_kv(kv, kv, pool, pool, batch.slot_mapping)
    elif v.op.startswith("backward"):
        grad = torch.zeros(pool.shape, dtype=torch.float32, device=device)
        lse = torch.zeros(tokens, heads, dtype=torch.float32, device=device)
        paged_attention_backward(q, q, q, lse, pool, pool, grad, grad, batch, 0.1, ieee=v.ieee, num_splits=splits,
                                 dropout=dropout)
    else:
        # prefill/extend as training runs them (with the log-sum-exp), decode as generation does (without),
        # except with dropout, which only training draws: then a decode op is a thought step (with it)
        paged_attention(q, pool, pool, batch, 0.1, return_lse=v.op in ("prefill", "extend") or v.dropout,
                        num_splits=splits, ieee=v.ieee, dropout=dropout)


def check(variants: list[Variant], capabilities: tuple[int, ...] = (90,)) -> tuple[list[CompiledKernel], list[VariantResult]]:
    """Compile every variant for every target in this process (kernels must not be interpreted).

    A compile error, or a kernel over the target's shared memory, is recorded as the variant's error.
    """
    from triton.runtime import driver

    from ._launch import interpreting

    if interpreting():
        raise RuntimeError("aot_check needs TRITON_INTERPRET unset before triton is imported: use check_in_subprocess")
    kernels: list[CompiledKernel] = []
    results: list[VariantResult] = []
    previous = getattr(driver, "_active", None)  # None on a machine without a GPU: nothing to restore
    for capability in capabilities:
        stand_in = StandInDriver(capability)
        stand_in.kernels = kernels
        driver.set_active(stand_in)
        try:
            for v in variants:
                result = VariantResult(v, arch_name(capability))
                before, stand_in.launches = len(kernels), []
                try:
                    _call_wrapper(v)
                except Exception as exc:  # noqa: BLE001 - reported per variant, the caller decides
                    result.error = f"{type(exc).__name__}: {exc}"[:4000]
                result.launched = sorted(set(stand_in.launches))
                result.compiled = list(range(before, len(kernels)))
                results.append(result)
        finally:
            if previous is not None:
                driver.set_active(previous)
    return kernels, results


def _jit_kernels():
    from . import paged_attention, paged_attention_bwd, store_kv

    return [paged_attention._paged_attention_fwd_kernel, paged_attention._merge_splits_kernel,
            paged_attention_bwd._bwd_dq_kernel, paged_attention_bwd._bwd_dkdv_kernel,
            paged_attention_bwd._bwd_one_token_kernel, store_kv._store_kv_kernel]


def _new_compiled_kernels(seen: set[int], arch: str) -> list[CompiledKernel]:
    """Kernels in the Triton JIT caches of our kernels that are not in `seen` (ids), with the resources
    the active driver reported when it loaded them; adds them to `seen`."""
    found = []
    for fn in _jit_kernels():
        for cache in fn.device_caches.values():
            for compiled in cache[0].values():
                if id(compiled) in seen:
                    continue
                seen.add(id(compiled))
                constants = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: val
                             for k, val in compiled.src.constants.items()}
                compiled._init_handles()
                found.append(CompiledKernel(
                    arch, fn.__name__, {k: val for k, val in constants.items() if isinstance(val, (int, bool))},
                    compiled.metadata.num_warps, compiled.metadata.num_stages, compiled.n_regs,
                    4 * compiled.n_spills, compiled.metadata.shared))
    return found


def check_on_device(variants: list[Variant]) -> tuple[list[CompiledKernel], list[VariantResult]]:
    """The same variants launched on the current CUDA device with the real driver; resources as it reports
    them (`n_regs`, `n_spills`, `metadata.shared`). `launched` lists the kernels each variant compiled."""
    kernels: list[CompiledKernel] = []
    results: list[VariantResult] = []
    seen: set[int] = set()
    capability = torch.cuda.get_device_capability()
    for v in variants:
        result = VariantResult(v, arch_name(capability[0] * 10 + capability[1]))
        try:
            _call_wrapper(v, "cuda")
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported per variant
            result.error = f"{type(exc).__name__}: {exc}"[:4000]
        for compiled in _new_compiled_kernels(seen, result.arch):
            result.launched.append(len(kernels))
            kernels.append(compiled)
        result.compiled = list(result.launched)
        results.append(result)
    return kernels, results


def check_in_subprocess(variants: list[Variant], capabilities: tuple[int, ...] = (90,),
                        cache_dir: str | None = None, timeout: float = 1800) -> tuple[list[dict], list[dict]]:
    """`check` in a fresh Python without the Triton interpreter; returns (kernels, results) as dicts.

    `cache_dir` is Triton's compile cache for the run (variants compiled once are reused).
    """
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    request = json.dumps({"variants": [asdict(v) for v in variants], "capabilities": list(capabilities)})
    proc = subprocess.run([sys.executable, "-m", "coconut_engine.kernels.aot_check", "--json-request", "-"],
                          input=request, capture_output=True, text=True, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"aot_check subprocess failed (exit {proc.returncode}, {len(lines)} lines out):\n"
                           f"{proc.stderr[-4000:]}")
    answer = json.loads(lines[-1])
    return answer["kernels"], answer["results"]


# what a training step launches (a decode op with dropout is a thought step, which stores the log-sum-exp)
TRAINING_OPS = ("prefill", "extend", "decode", "decode-split", "backward", "backward-one-token",
                "backward-one-token-split")


def default_variants() -> list[Variant]:
    """The CI subset: every kernel compiled for bf16 and fp32 (head_dim 128, GQA 4, page 16), plus a
    second split count that must compile nothing new, the bf16 backward at head_dim 80 (the
    smallest head_dim with the 8-warp dK/dV tiles), and the attention-dropout variants of the training
    kernels in bf16 (the thought step's one-token forward included)."""
    out = []
    for dtype in ("bf16", "fp32"):
        out += [Variant(op, dtype) for op in ("extend", "decode-split", "backward", "backward-one-token-split",
                                              "store_kv")]
    out.append(Variant("decode-split", "bf16", splits=7))
    out.append(Variant("backward", "bf16", head_dim=80))
    out += [Variant(op, "bf16", dropout=True) for op in ("extend", "decode-split", "backward",
                                                        "backward-one-token-split")]
    return out


def head_dim_variants() -> list[Variant]:
    """Every op and dtype over the head dims 64-256 (GQA 4, page 16), and the exact fp32 (IEEE) variants
    the comparison tests launch: the resource table of benchmarks/README.md."""
    out = [Variant(op, dtype, hd) for dtype in ("bf16", "fp16", "fp32") for op in OPS for hd in (64, 80, 96, 128, 256)]
    for op in ("extend", "decode", "backward", "backward-one-token"):
        out += [Variant(op, "fp32", hd, ieee=True) for hd in (64, 128, 256)]
    out += [Variant(op, dtype, hd, dropout=True) for dtype in ("bf16", "fp16", "fp32") for op in TRAINING_OPS
            for hd in (64, 128, 256)]
    return out


def full_variants() -> list[Variant]:
    """The full matrix: `head_dim_variants`, plus GQA groups 1-16 and page sizes 8-128 swept at head_dim 128."""
    out = head_dim_variants()
    for dtype in ("bf16", "fp16", "fp32"):
        for op in OPS:
            shapes = [(128, g, 16) for g in (1, 2, 7, 8, 16)] + [(128, 4, p) for p in (8, 64, 128)]
            out += [Variant(op, dtype, hd, g, p) for hd, g, p in shapes]
    return out


def markdown_table(kernels: list[dict], results: list[dict]) -> str:
    """One row per (variant, kernel launched): launch options and resources."""
    lines = ["| arch | op | dtype | head_dim | group | page | kernel | BLOCK_M x N | warps | stages | regs "
             "| spill B | shared B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v = r["variant"]
        dtype = v["dtype"] + (" ieee" if v["ieee"] else "") + (" dropout" if v.get("dropout") else "")
        if r["error"]:
            lines.append(f"| {r['arch']} | {v['op']} | {dtype} | {v['head_dim']} | {v['group']} | {v['page_size']} "
                         f"| ERROR: {r['error'].splitlines()[0][:80]} | | | | | | |")
        for i in r["launched"]:
            k = kernels[i]
            tiles = f"{k['constants'].get('BLOCK_M', '')} x {k['constants'].get('BLOCK_N', '')}".strip(" x")
            lines.append(f"| {k['arch']} | {v['op']} | {dtype} | {v['head_dim']} | {v['group']} | {v['page_size']} "
                         f"| {k['kernel'].lstrip('_')} | {tiles} | {k['num_warps']} | {k['num_stages']} "
                         f"| {k['registers']} | {k['spill_bytes']} | {k['shared_bytes']} |")
    return "\n".join(lines)


def summary_table(kernels: list[dict], results: list[dict]) -> str:
    """One row per (kernel, dtype, head_dim) over every GQA group, page size and op of the matrix, the
    targets side by side (`sm_90a / sm_80`): range of registers, worst spill, most shared memory."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        v = r["variant"]
        for i in r["launched"]:
            k = kernels[i]
            key = (k["kernel"].lstrip("_"), v["dtype"] + (" ieee" if v["ieee"] else "")
                   + (" dropout" if v.get("dropout") else ""), v["head_dim"])
            per_arch = groups.setdefault(key, {}).setdefault(k["arch"], [])
            if k not in per_arch:
                per_arch.append(k)
    archs = sorted({k["arch"] for k in kernels}, reverse=True)
    names = " / ".join(archs)
    lines = [f"| kernel | dtype | head_dim | warps | BLOCK_M x N | regs ({names}) | spill B | shared KB |",
             "|---|---|---:|---|---|---|---|---|"]
    for (name, dtype, head_dim), by_arch in sorted(groups.items()):
        ks = [k for a in archs for k in by_arch.get(a, [])]
        warps = "/".join(str(w) for w in sorted({k["num_warps"] for k in ks}))
        tiles = ", ".join(sorted({f"{k['constants']['BLOCK_M']}x{k['constants']['BLOCK_N']}" for k in ks
                                  if "BLOCK_M" in k["constants"]}))

        def per_arch(fn):
            return " / ".join(fn(by_arch[a]) if a in by_arch else "-" for a in archs)

        regs = per_arch(lambda g: f"{min(k['registers'] for k in g)}-{max(k['registers'] for k in g)}")
        spill = per_arch(lambda g: str(max(k["spill_bytes"] for k in g)))
        shared = per_arch(lambda g: f"{max(k['shared_bytes'] for k in g) / 1024:.0f}")
        lines.append(f"| {name} | {dtype} | {head_dim} | {warps} | {tiles} | {regs} | {spill} | {shared} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """CLI: `--json-request -` answers a subprocess request; otherwise compile a matrix and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-request", help="read {variants, capabilities} JSON from this file ('-' = stdin)")
    parser.add_argument("--matrix", choices=["default", "head-dims", "full"], default="default")
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    parser.add_argument("--out", help="also write kernels and results as JSON here")
    parser.add_argument("--summary", action="store_true", help="one row per target, kernel, dtype and head_dim")
    parser.add_argument("--from-json", help="print the table of an earlier --out file instead of compiling")
    parser.add_argument("--device", choices=["stand-in", "cuda"], default="stand-in",
                        help="cuda: launch on the GPU with the real driver (run without TRITON_INTERPRET)")
    args = parser.parse_args(argv)
    if args.json_request:
        request = json.load(sys.stdin if args.json_request == "-" else open(args.json_request))
        kernels, results = check([Variant(**v) for v in request["variants"]], tuple(request["capabilities"]))
        print(json.dumps({"kernels": [asdict(k) for k in kernels], "results": [asdict(r) for r in results]}))
        return 0
    variants = {"default": default_variants, "head-dims": head_dim_variants, "full": full_variants}[args.matrix]()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        kernels, results = saved["kernels"], saved["results"]
    elif args.device == "cuda":
        found, ran = check_on_device(variants)
        kernels, results = [asdict(k) for k in found], [asdict(r) for r in ran]
    else:
        kernels, results = check_in_subprocess(variants, tuple(int(a) for a in args.arch.split(",")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kernels": kernels, "results": results}, f, indent=1)
    print(summary_table(kernels, results) if args.summary else markdown_table(kernels, results))
    failed = [r for r in results if r["error"]]
    print(f"\n{len(kernels)} kernels compiled for {len(results)} variant launches; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
