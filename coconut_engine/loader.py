"""Thin safetensors loader: a Hugging Face model directory <-> Decoder, without transformers.

`load_model` builds the Decoder on the meta device, allocates it once on the target device, and
fills it one tensor at a time through `safetensors.safe_open` (peak host memory: about one copy of
the weights). Each HF tensor name maps to a slice of one engine parameter (q/k/v and gate/up are
fused in the engine; GPT-2's Conv1D weights are transposed). `save_model` writes the HF layout back.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .model import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# Buffers that older checkpoints carry and the engine recomputes.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


@dataclass(frozen=True)
class TensorSlot:
    """Where one HF tensor lives in the engine: rows [start, stop) of a parameter, maybe transposed."""

    param: str
    start: int | None = None
    stop: int | None = None
    transposed: bool = False


def checkpoint_layout(config: ModelConfig) -> dict[str, TensorSlot]:
    """HF tensor name -> engine parameter slot, for every tensor a checkpoint of `config` holds."""
    layout: dict[str, TensorSlot] = {}
    if config.model_type == "gpt2":
        layout["transformer.wte.weight"] = TensorSlot("embed_tokens.weight")
        layout["transformer.wpe.weight"] = TensorSlot("embed_positions.weight")
        for i in range(config.num_layers):
            hf, me = f"transformer.h.{i}.", f"layers.{i}."
            for part, dst, transposed in (
                ("ln_1", "attn_norm", False), ("ln_2", "mlp_norm", False), ("attn.c_attn", "attn.qkv_proj", True),
                ("attn.c_proj", "attn.o_proj", True), ("mlp.c_fc", "mlp.fc_in", True), ("mlp.c_proj", "mlp.fc_out", True),
            ):
                layout[f"{hf}{part}.weight"] = TensorSlot(f"{me}{dst}.weight", transposed=transposed)
                layout[f"{hf}{part}.bias"] = TensorSlot(f"{me}{dst}.bias")
        layout["transformer.ln_f.weight"] = TensorSlot("final_norm.weight")
        layout["transformer.ln_f.bias"] = TensorSlot("final_norm.bias")
    else:
        layout["model.embed_tokens.weight"] = TensorSlot("embed_tokens.weight")
        q, kv, inner = config.q_size, config.kv_size, config.intermediate_size
        for i in range(config.num_layers):
            hf, me = f"model.layers.{i}.", f"layers.{i}."
            layout[f"{hf}input_layernorm.weight"] = TensorSlot(f"{me}attn_norm.weight")
            layout[f"{hf}post_attention_layernorm.weight"] = TensorSlot(f"{me}mlp_norm.weight")
            kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
            for kind in kinds:
                qkv = f"{me}attn.qkv_proj.{kind}"
                layout[f"{hf}self_attn.q_proj.{kind}"] = TensorSlot(qkv, 0, q)
                layout[f"{hf}self_attn.k_proj.{kind}"] = TensorSlot(qkv, q, q + kv)
                layout[f"{hf}self_attn.v_proj.{kind}"] = TensorSlot(qkv, q + kv, q + 2 * kv)
            for kind in ("weight", "bias") if config.o_bias else ("weight",):
                layout[f"{hf}self_attn.o_proj.{kind}"] = TensorSlot(f"{me}attn.o_proj.{kind}")
            if config.qk_norm:
                layout[f"{hf}self_attn.q_norm.weight"] = TensorSlot(f"{me}attn.q_norm.weight")
                layout[f"{hf}self_attn.k_norm.weight"] = TensorSlot(f"{me}attn.k_norm.weight")
            for kind in ("weight", "bias") if config.mlp_bias else ("weight",):
                gate_up = f"{me}mlp.gate_up_proj.{kind}"
                layout[f"{hf}mlp.gate_proj.{kind}"] = TensorSlot(gate_up, 0, inner)
                layout[f"{hf}mlp.up_proj.{kind}"] = TensorSlot(gate_up, inner, 2 * inner)
                layout[f"{hf}mlp.down_proj.{kind}"] = TensorSlot(f"{me}mlp.down_proj.{kind}")
        layout["model.norm.weight"] = TensorSlot("final_norm.weight")
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = TensorSlot("lm_head.weight")
    return layout


def _canonical_name(name: str, config: ModelConfig) -> str:
    """GPT-2 checkpoints come with or without the `transformer.` prefix; store it with."""
    if config.model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def resolve_dtype(dtype, config: ModelConfig | None = None) -> torch.dtype:
    """A floating torch dtype from a dtype, a name ("bf16", "float32", ...), "auto" or None (fp32)."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        name = (config.raw.get("dtype") or config.raw.get("torch_dtype") or "float32") if config else "float32"
        return resolve_dtype(name)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported (use one of {sorted(set(_DTYPES))})")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CheckpointError(f"dtype {dtype} is not supported: weights load as float32, float16 or bfloat16")
    return dtype


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (single file, or the shards named by the index)."""
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    index = path / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    weight_map = _read_weight_map(index)
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = path / shard
        if not shard_path.is_file():
            tensor = next(name for name, file in weight_map.items() if file == shard)
            raise CheckpointError(f"{index}: shard {shard} (holding tensor {tensor}) does not exist")
        files.append(shard_path)
    return files


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's `weight_map` (tensor name -> shard file name); shards must lie inside the model folder."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not valid JSON ({exc})") from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a safetensors index (needs a non-empty 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a file name, got {shard!r}")
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts or len(parts) != 1 or "\\" in shard or "\x00" in shard:
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {shard!r} is not a file name inside the model "
                                  "folder (absolute paths, '..' and sub-folders are refused)")
    return weight_map


def read_headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...], str]]:
    """Every tensor's (file, name as stored, shape, dtype) from the safetensors headers; no data is read."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, tuple[Path, str, tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for raw_name in f.keys():
                    info = f.get_slice(raw_name)
                    headers.setdefault(raw_name, (file, raw_name, tuple(info.get_shape()), info.get_dtype()))
                    if headers[raw_name][0] != file:
                        raise CheckpointError(f"{file}: tensor {raw_name!r} also appears in {headers[raw_name][0].name}")
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot read ({exc})") from exc
    return headers


_LAYER_INDEX = re.compile(r"^(?:transformer\.h|model\.layers)\.(\d+)\.")


def _check_layer_count(headers, config: ModelConfig, path: Path) -> None:
    """A config with more layers than the files hold is an error naming the key: building even a meta
    Decoder of 10**6 layers takes minutes and gigabytes of host memory."""
    found = {int(m.group(1)) for name in headers if (m := _LAYER_INDEX.match(_canonical_name(name, config)))}
    if config.num_layers - 1 not in found:
        key = "n_layer" if config.model_type == "gpt2" else "num_hidden_layers"
        raise CheckpointError(f"{path / 'config.json'}: {key}={config.num_layers}, but the weights hold "
                              f"{len(found)} layer(s) (no tensor of layer {config.num_layers - 1})")


def _check_headers(headers, layout: dict[str, TensorSlot], params: dict[str, torch.Tensor],
                   config: ModelConfig, path: Path, files: list[Path]) -> dict[str, tuple[Path, str]]:
    """Match the headers against the config's layout before anything is allocated; returns
    engine name -> (file, stored name) of the tensors to load."""
    wanted: dict[str, tuple[Path, str]] = {}
    for raw_name, (file, _, shape, dtype) in headers.items():
        name = _canonical_name(raw_name, config)
        if _IGNORED.search(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        slot = layout.get(name)
        if slot is None:
            raise CheckpointError(f"{file}: unexpected tensor {raw_name!r} for a {config.model_type} model")
        if name in wanted:
            raise CheckpointError(f"{file}: tensor {raw_name!r} also appears in {wanted[name][0].name}")
        if dtype not in _FLOAT_HEADER_DTYPES:
            shown = _HEADER_DTYPE_NAMES.get(dtype, dtype)
            raise CheckpointError(f"{file}: tensor {raw_name!r} has dtype {shown}, expected a floating type")
        target = params[slot.param] if slot.start is None else params[slot.param][slot.start : slot.stop]
        want = tuple(reversed(target.shape)) if slot.transposed else tuple(target.shape)
        if shape != want:
            raise CheckpointError(f"{file}: tensor {raw_name!r} has shape {shape}, expected {want} "
                                  f"(from {path / 'config.json'})")
        wanted[name] = (file, raw_name)
    missing = [name for name in layout if name not in wanted]
    if missing:
        where = files[0] if len(files) == 1 else path / INDEX_FILE
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")
    return wanted


_FLOAT_HEADER_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_HEADER_DTYPE_NAMES = {"BOOL": "torch.bool", "U8": "torch.uint8", "I8": "torch.int8", "I16": "torch.int16",
                       "I32": "torch.int32", "I64": "torch.int64"}


def load_model(path, dtype=None, device="cpu", attention_backend: str = "auto",
               allow_non_finite: bool = False) -> Decoder:
    """Build a Decoder from a Hugging Face model directory (config.json + safetensors).

    `dtype`: None (float32), "auto" (the config's dtype) or a floating dtype / name.
    Every missing, unexpected or mis-shaped tensor and every unreadable file raises CheckpointError
    naming the file and the tensor; nothing is left at its initial value. Shapes are checked
    against the files' headers before the weights are allocated. A tensor holding NaN or Inf (also
    after the conversion to `dtype`, e.g. float32 values beyond float16's range) is a CheckpointError
    naming it unless `allow_non_finite`.
    """
    from safetensors import SafetensorError, safe_open

    from .attention import BACKENDS
    from .errors import InvalidArgumentError
    from .validation import check_device

    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"load_model: path must be a folder path, got {type(path).__name__} {path!r:.40}")
    if attention_backend is not None and attention_backend not in BACKENDS:  # None: "auto", as Decoder takes it
        raise InvalidArgumentError(f"load_model: attention_backend {attention_backend!r} is not one of {BACKENDS}")
    check_device(device, "load_model: device")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    if not any(path.iterdir()):
        raise CheckpointError(f"{path}: model directory is empty")
    config = ModelConfig.from_file(path)
    dtype = resolve_dtype(dtype, config)
    files = weight_files(path)
    headers = read_headers(files)
    _check_layer_count(headers, config, path)  # before a Decoder of the config's depth is built, even on meta
    with torch.device("meta"):
        model = Decoder(config, attention_backend=attention_backend)
    layout = checkpoint_layout(config)
    wanted = _check_headers(headers, layout, dict(model.named_parameters()), config, path, files)
    model = model.to(dtype).to_empty(device=device)
    model.reset_buffers()
    params = dict(model.named_parameters())
    for file in files:
        names = [(name, raw_name) for name, (f_, raw_name) in wanted.items() if f_ == file]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name, raw_name in names:
                    tensor = f.get_tensor(raw_name)
                    target = _copy_into(params[layout[name].param], layout[name], tensor, file, raw_name)
                    # checked after the conversion to `dtype`: a finite float32 value can overflow float16
                    if not allow_non_finite and not torch.isfinite(target).all():
                        why = ("holds NaN or Inf values" if not torch.isfinite(tensor).all() else
                               f"holds values outside the range of {target.dtype} (they become Inf)")
                        raise CheckpointError(f"{file}: tensor {raw_name!r} {why} "
                                              "(load_model(..., allow_non_finite=True) loads it anyway)")
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot read ({exc})") from exc
    return model.eval()  # as transformers' from_pretrained: dropout off until a trainer calls .train()


def _copy_into(param: torch.Tensor, slot: TensorSlot, tensor: torch.Tensor, file: Path, name: str) -> torch.Tensor:
    """Copy `tensor` into its slot of `param`; returns the slot (in the model's dtype)."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected a floating type")
    if slot.transposed:
        tensor = tensor.t()
    target = param.data if slot.start is None else param.data[slot.start : slot.stop]
    if tuple(tensor.shape) != tuple(target.shape):
        want = tuple(reversed(target.shape)) if slot.transposed else tuple(target.shape)
        got = tuple(reversed(tensor.shape)) if slot.transposed else tuple(tensor.shape)
        raise CheckpointError(f"{file}: tensor {name!r} has shape {got}, expected {want}")
    with torch.no_grad():
        target.copy_(tensor)
    return target


def state_dict_hf(model: Decoder) -> dict[str, torch.Tensor]:
    """The Decoder's weights under their Hugging Face names (slices and transposes undone)."""
    params = dict(model.named_parameters())
    out = {}
    for name, slot in checkpoint_layout(model.config).items():
        tensor = params[slot.param].detach()
        if slot.start is not None:
            tensor = tensor[slot.start : slot.stop]
        if slot.transposed:
            tensor = tensor.t()
        out[name] = tensor.contiguous().cpu()
    return out


def save_model(model: Decoder, path, shard_size: int | None = None) -> None:
    """Write `model` as a Hugging Face directory (config.json + safetensors, sharded above `shard_size` bytes).

    Each file is written under a temporary name and renamed into place.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_hf(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard_size is not None and shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in (path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")):
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic(path / SINGLE_FILE, lambda tmp: save_file(shards[0], str(tmp), metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic(path / file, lambda tmp, s=shard: save_file(s, str(tmp), metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic(path / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    config = model.config.to_dict()
    config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    _atomic(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, target)


def load_tokenizer(path):
    """The tokenizer of a model directory (its tokenizer.json, through transformers); a file that
    transformers cannot read is a CheckpointError naming the directory's tokenizer files."""
    path = Path(path)
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_dir():
        raise CheckpointError(f"{tokenizer_file} is a folder, not the tokenizer file")
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{path}: tokenizer.json not found")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # JSON, encoding and schema errors surface as many types (even a bare Exception)
        files = ", ".join(p.name for p in sorted(path.glob("tokenizer*")) + sorted(path.glob("special_tokens_map.json")))
        raise CheckpointError(f"{path}: transformers cannot load the tokenizer from {files} "
                              f"({type(exc).__name__}: {str(exc)[:300]})") from exc
