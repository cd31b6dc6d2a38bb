"""The thought transform: what a continuous thought feeds back as the next input embedding.

Coconut feeds the last hidden state `h` (final-norm output of the position before the thought)
straight back (`identity`, the official behaviour and the default). The other variants learn a map;
`gated` and `linear` start as the identity exactly, so that switching one on does not change a
trained model at step 0 (`norm` does: it rescales every thought to the embeddings' mean norm):

- `gated`: `x = h + g * (e - h)` with `g = gain * sigmoid(W [h; e] + b)` and `e` the `<|latent|>`
  token's embedding: a learned per-dimension mix of the hidden state and a token embedding. `gain`
  (one scalar) starts at 0, so the gate is closed; it and the gate train with the model.
- `linear`: `x = A h + c`, `A` initialised to the identity matrix and `c` to zero.
- `norm`: `x = s * h / ||h||`, re-normalising to the embedding's scale; `s` starts as the mean norm
  of the token embeddings (a learned scalar).

Every training mode (coconut.py) and generation (generate.py) call `transform.next_inputs` at the
point where a thought's input embedding is formed, with the thought's index where a variant reads it
(`uses_index`: `forward(hidden, marker, index)`, `index[n]` = how many thoughts sequence n already has); the trainer saves the parameters in the
checkpoint as `thought_transform.safetensors`, named with the variant in `coconut.json`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import CheckpointError

TRANSFORM_FILE = "thought_transform.safetensors"
COCONUT_KEY = "thought_transform"


class ThoughtTransform(nn.Module):
    """Base class: `forward(hidden [N, H], marker [H], index [N]) -> next input embeddings [N, H]`."""

    kind = "identity"
    uses_marker = False  # whether forward reads the <|latent|> embedding (computed only then)
    uses_index = False  # whether forward reads the thought index (a tensor made only then)

    def forward(self, hidden: torch.Tensor, marker: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """The official feed-back: the hidden state itself."""
        return hidden

    def next_inputs(self, hidden: torch.Tensor, embedding_weight: torch.Tensor, thought_token: int,
                    index: int | Sequence[int] = 0) -> torch.Tensor:
        """The thoughts' input embeddings after the positions whose last hidden states are `hidden`: the
        one call that training (every mode) and generation make to form a thought. `index`: each row's
        thought index (0 for the first thought; one int for all rows, or one per row). The
        `<|latent|>` row of `embedding_weight` and the index tensor are made only for variants that
        read them."""
        marker = embedding_weight[thought_token] if self.uses_marker else None
        if not self.uses_index:
            return self(hidden, marker)
        count = hidden.shape[0]
        index = [int(index)] * count if isinstance(index, int) else [int(i) for i in index]
        if len(index) != count:
            raise ValueError(f"thought index: {len(index)} indices for {count} hidden states")
        return self(hidden, marker, torch.tensor(index, dtype=torch.long, device=hidden.device))


class GatedThought(ThoughtTransform):
    """`h + gain * sigmoid(W [h; e] + b) * (e - h)`; gain starts at 0 (identity)."""

    kind = "gated"
    uses_marker = True

    def __init__(self, hidden_size: int):
        super().__init__()
        self.gate = nn.Linear(2 * hidden_size, hidden_size)
        self.gain = nn.Parameter(torch.zeros(()))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, hidden: torch.Tensor, marker: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """Mix each hidden state with the marker embedding through the learned gate."""
        if marker is None:
            raise ValueError("the gated thought transform needs the <|latent|> embedding (marker)")
        marker = marker.to(hidden.dtype).expand_as(hidden)
        gate = self.gain * torch.sigmoid(self.gate(torch.cat([hidden, marker], dim=-1)))
        return hidden + gate * (marker - hidden)


class LinearThought(ThoughtTransform):
    """`A h + c`, starting at `A = I`, `c = 0`."""

    kind = "linear"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden_size))
            self.proj.bias.zero_()

    def forward(self, hidden: torch.Tensor, marker: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """A learned affine map of each hidden state."""
        return self.proj(hidden)


class NormThought(ThoughtTransform):
    """`s * h / ||h||` with `s` a learned scalar starting at the embeddings' mean norm."""

    kind = "norm"

    def __init__(self, hidden_size: int, embedding_scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(embedding_scale)))

    def forward(self, hidden: torch.Tensor, marker: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """Each hidden state rescaled to the embedding's norm."""
        norm = hidden.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return (hidden.float() * (self.scale / norm)).to(hidden.dtype)


THOUGHT_TRANSFORMS = {cls.kind: cls for cls in (ThoughtTransform, GatedThought, LinearThought, NormThought)}


def build_thought_transform(kind: str, embedding_weight: torch.Tensor) -> ThoughtTransform:
    """A new transform of variant `kind` for a model whose token embedding matrix is `embedding_weight`
    (its width sets the size; `norm` takes its scale from it), on that matrix's device and dtype."""
    if kind not in THOUGHT_TRANSFORMS:
        raise ValueError(f"thought transform {kind!r} is not one of {', '.join(THOUGHT_TRANSFORMS)}")
    hidden_size = embedding_weight.shape[1]
    if kind == "identity":
        transform = ThoughtTransform()
    elif kind == "norm":
        transform = NormThought(hidden_size, float(embedding_weight.detach().float().norm(dim=1).mean()))
    else:
        transform = THOUGHT_TRANSFORMS[kind](hidden_size)
    return transform.to(device=embedding_weight.device, dtype=embedding_weight.dtype)


def save_thought_transform(transform: ThoughtTransform, directory: str | Path) -> dict:
    """Write the transform's parameters (if it has any) into `directory`; returns the `coconut.json`
    entry that names the variant and the file."""
    from safetensors.torch import save_file

    entry = {"kind": transform.kind}
    state = {name: t.detach().contiguous().cpu() for name, t in transform.state_dict().items()}
    if state:
        save_file(state, str(Path(directory) / TRANSFORM_FILE))
        entry["file"] = TRANSFORM_FILE
    return entry


def load_thought_transform(directory: str | Path, entry: dict | None,
                           embedding_weight: torch.Tensor) -> ThoughtTransform:
    """The transform described by a checkpoint's `coconut.json` entry (identity when there is none),
    with its parameters read from the file the entry names; a malformed entry is a CheckpointError
    naming coconut.json, every missing, unexpected, mis-shaped, non-float or non-finite tensor one
    naming the file and the tensor."""
    source = Path(directory) / "coconut.json"
    if entry is None:
        return build_thought_transform("identity", embedding_weight)
    if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str) or entry["kind"] not in THOUGHT_TRANSFORMS:
        raise CheckpointError(f"{source}: '{COCONUT_KEY}' must be an object with 'kind' one of "
                              f"{', '.join(THOUGHT_TRANSFORMS)}, got {json.dumps(entry)}")
    transform = build_thought_transform(entry["kind"], embedding_weight)
    expected = transform.state_dict()
    if not expected:
        return transform
    if "file" not in entry:
        raise CheckpointError(f"{source}: the {entry['kind']} thought transform names no parameter file ('file')")
    name = entry["file"]
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"{source}: '{COCONUT_KEY}' 'file' must be the name of a file in the checkpoint "
                              f"folder, got {json.dumps(name)}")
    file = Path(directory) / entry["file"]
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{file}: thought transform {entry['kind']!r}: missing tensor(s) {missing}, "
                                      f"unexpected tensor(s) {unexpected}")
            loaded = {}
            for name, ref in expected.items():
                tensor = f.get_tensor(name)
                if tensor.shape != ref.shape:
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                          f"{entry['kind']} transform of this model needs {tuple(ref.shape)}")
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected a float tensor")
                if not torch.isfinite(tensor).all():
                    raise CheckpointError(f"{file}: tensor {name!r} holds NaN or Inf")
                loaded[name] = tensor.to(device=ref.device, dtype=ref.dtype)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{file}: cannot read the thought transform ({exc})") from exc
    transform.load_state_dict(loaded)
    return transform
