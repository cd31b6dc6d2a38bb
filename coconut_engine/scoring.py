"""Score any model the way training evaluates: a Coconut checkpoint (its own method and stage, from
coconut.json) or a plain Hugging Face directory (the untouched base model) with a method and stage
given, the Coconut markers added as training adds them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import COCONUT_FILE, checkpoint_dirs, checkpoint_thought_transform, coconut_rules, load_checkpoint
from .coconut import SpecialTokens, add_special_tokens
from .data import DATA_MODES, Record, StageRules
from .errors import CheckpointError
from .model import Decoder
from .thoughts import ThoughtTransform

METHODS = DATA_MODES  # no_cot | cot | coconut (and the ablations no_thoughts, pause_as_thought)
DEFAULT_MAX_LATENT_STAGE = 6  # the official ProsQA setting, for base models that have none


@dataclass
class ScoringSetup:
    """A model ready for `trainer.evaluate`: weights, tokenizer, markers, curriculum rules and stage."""

    decoder: Decoder
    tokenizer: object
    tokens: SpecialTokens
    rules: StageRules
    stage: int
    label: str
    thought_transform: ThoughtTransform | None = None  # a checkpoint's trained one; None: identity

    def evaluate(self, records: list[Record], max_new_tokens: int, progress: bool = False, **thinking) -> dict:
        """Score `records` (trainer.evaluate's result, plus this setup's label, method and stage);
        `thinking`: evaluate's num_thoughts / max_thoughts / eot_threshold / return_thoughts."""
        from .trainer import evaluate

        result = evaluate(self.decoder, self.tokenizer, self.tokens, records, self.stage, self.rules,
                          max_new_tokens, progress=progress, thought_transform=self.thought_transform, **thinking)
        return {**result, "label": self.label, "method": self.rules.mode, "stage": self.stage}


def default_device(device: str | None = None) -> str:
    """`device` if given, else CUDA when present, else CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def is_coconut_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a coconut.json (a model trained by coconut-engine)."""
    return (Path(path) / COCONUT_FILE).is_file()


def load_for_scoring(path: str | Path, method: str | None = None, stage: int | None = None,
                     device: str | None = None, attention_backend: str = "auto", c_thought: int | None = None,
                     max_latent_stage: int | None = None, pad_latent_to_max: bool | None = None) -> ScoringSetup:
    """Load a checkpoint or a plain HF model directory for scoring (see the module docstring).

    A checkpoint's method, stage and curriculum settings are its coconut.json's unless given; a plain
    directory needs `method` (its stage defaults to 0, c_thought to 1, max_latent_stage to 6).
    """
    from .loader import load_model, load_tokenizer

    path = Path(path)
    if method is not None and method not in METHODS:
        raise CheckpointError(f"{path}: method {method!r} is not one of {', '.join(METHODS)}")
    if stage is not None and stage < 0:
        raise CheckpointError(f"{path}: stage must be >= 0, got {stage}")
    _check_stage_has_thoughts(path, method, stage)  # before anything loads
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a folder' if path.exists() else 'model directory does not exist'} "
                              "(a checkpoint-NNNN folder of a run, or a model directory)")
    run_checkpoints = [] if (path / "config.json").is_file() or is_coconut_checkpoint(path) else checkpoint_dirs(path)
    if run_checkpoints:
        raise CheckpointError(f"{path}: a run's folder, not a model: pick one of its checkpoints "
                              f"({', '.join(p.name for p in run_checkpoints[-3:])})")
    device = default_device(device)
    if is_coconut_checkpoint(path):
        decoder, tokenizer, tokens, info, _ = load_checkpoint(path, device=device, attention_backend=attention_backend)
        trained, trained_stage = coconut_rules(path, info)  # checked, each key named
        transform = checkpoint_thought_transform(path, info, decoder)
    else:
        if method is None:
            raise CheckpointError(f"{path}: a plain model directory (no {COCONUT_FILE}): give the method to score "
                                  f"it with ({', '.join(METHODS)}) and, for coconut, the stage")
        decoder = load_model(path, device=device, attention_backend=attention_backend)
        tokenizer = load_tokenizer(path)
        tokens = add_special_tokens(decoder, tokenizer)  # as training adds them
        trained = StageRules(1, DEFAULT_MAX_LATENT_STAGE, False, 0.0, method)
        trained_stage = 0
        transform = None
    mode = method or trained.mode
    rules = StageRules(trained.c_thought if c_thought is None else c_thought,
                       trained.max_latent_stage if max_latent_stage is None else max_latent_stage,
                       trained.pad_latent_to_max if pad_latent_to_max is None else pad_latent_to_max,
                       0.0, mode)
    _check_stage_has_thoughts(path, mode, stage)  # the checkpoint's own method
    stage = 0 if mode in ("cot", "no_cot") else trained_stage if stage is None else stage
    label = f"{path.name}: {mode}" + (f" stage {stage}" if mode not in ("cot", "no_cot") else "")
    return ScoringSetup(decoder.eval(), tokenizer, tokens, rules, stage, label, transform)


def _check_stage_has_thoughts(path: Path, mode: str | None, stage: int | None) -> None:
    if mode in ("cot", "no_cot") and stage:
        raise CheckpointError(f"{path}: stage {stage} given, but {mode} scoring has no stages (it feeds no "
                              "thoughts); score with method 'coconut' to use a stage's thoughts")


def trained_thoughts(path: str | Path) -> tuple[int, bool | None]:
    """(thoughts, markers) a checkpoint was trained to use on a question of unknown length: its stage
    capped at max_latent_stage, times c_thought; markers unless it trained without them. A plain
    model directory: (0, None), the generator's default (markers only with thoughts)."""
    from .checkpoint import read_coconut_info

    if not is_coconut_checkpoint(path):
        return 0, None
    _, info = read_coconut_info(path)
    try:
        rules = StageRules(info["c_thought"], info["max_latent_stage"], True, 0.0, info["mode"])
        stage = int(info["stage"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{Path(path) / COCONUT_FILE}: malformed curriculum settings ({exc})") from exc
    if rules.mode == "pause_as_thought":
        raise CheckpointError(f"{path}: a pause_as_thought checkpoint thinks in <|latent|> tokens, not hidden "
                              "states: score it with `coconut-engine eval`")
    return rules.eval_thoughts(stage, num_steps=stage), rules.markers
