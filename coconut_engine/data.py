"""Official Coconut data: the JSON format, its tokenization, the curriculum stage builder, batching.

The official format is a JSON list of `{"question", "steps", "answer"}` objects (extra keys ignored).
Tokenization follows the official code: `question + "\\n"`, each step + `"\\n"`, `"### " + answer`, eos.

A training sample is a CoconutSample `prompt | n thoughts | suffix` whose loss covers `suffix[1:]`.
The builder maps the official rules onto that shape:

- coconut: stage s skips s steps and inserts s*c thoughts between `<bot>` and `<eot>`; past
  `max_latent_stage` all steps go and `max_latent_stage` thoughts remain (or min(steps, max) without
  `pad_latent_to_max`); with probability `uniform_prob` a sample draws its stage uniformly.
- cot: stage 0 forever, no markers; no_cot: question then answer; no_thoughts: the curriculum
  without thoughts (markers, no thoughts); pause_as_thought: the curriculum with `<thought>`
  tokens as ordinary inputs instead of hidden states.

Labels follow the official masking: question, markers and thoughts carry none.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .coconut import CoconutSample, SpecialTokens
from .errors import CoconutEngineError
from .validation import unicode_problem

DATA_MODES = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought")


class DataError(CoconutEngineError, ValueError):
    """A data file or record is not in the official Coconut format."""


@dataclass(frozen=True)
class Record:
    """One question of the official format."""

    question: str
    steps: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class TokenizedRecord:
    question: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    answer: tuple[int, ...]  # "### " + answer, then eos


@dataclass(frozen=True)
class StageRules:
    """The curriculum settings (official names)."""

    c_thought: int = 1
    max_latent_stage: int = 6
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0
    mode: str = "coconut"

    def __post_init__(self):
        if self.mode not in DATA_MODES:
            raise DataError(f"mode {self.mode!r} is not one of {DATA_MODES}")
        if self.c_thought < 1 and self.mode in ("coconut", "pause_as_thought"):
            raise DataError(f"c_thought must be >= 1 in mode {self.mode}, got {self.c_thought}")
        if self.max_latent_stage < 0:
            raise DataError(f"max_latent_stage must be >= 0, got {self.max_latent_stage}")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise DataError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if self.uniform_prob > 0 and self.mode in ("cot", "no_cot"):
            raise DataError(f"uniform_prob={self.uniform_prob} has no meaning in mode {self.mode} (no curriculum)")

    @property
    def markers(self) -> bool:
        return self.mode not in ("cot", "no_cot")

    def skip_and_thoughts(self, stage: int, num_steps: int) -> tuple[int, int]:
        """(steps removed, thoughts inserted) for a sample with `num_steps` steps at `stage`."""
        if self.mode == "no_cot":
            return num_steps, 0
        if self.mode == "cot":
            return 0, 0
        if stage > self.max_latent_stage:
            skip = num_steps
            latent = self.max_latent_stage if self.pad_latent_to_max else min(num_steps, self.max_latent_stage)
        else:
            skip, latent = stage, stage
        thoughts = 0 if self.mode == "no_thoughts" else latent * self.c_thought
        return skip, thoughts

    def eval_thoughts(self, stage: int, num_steps: int) -> int:
        """Thoughts given to a question at evaluation (the official question-only collator): the stage,
        capped at `max_latent_stage` and, without `pad_latent_to_max`, at the question's step count."""
        if self.mode in ("cot", "no_cot", "no_thoughts"):
            return 0
        cap = self.max_latent_stage if self.pad_latent_to_max else min(self.max_latent_stage, num_steps)
        return min(cap, stage) * self.c_thought


def read_json(path: str | Path):
    """A JSON file's content; a missing, unreadable or malformed file is a DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:  # a folder, no permission, ...
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def load_records(path: str | Path) -> list[Record]:
    """Read an official-format JSON file; a malformed record is an error naming its index."""
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"{path}: the file holds no records")
    records = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {i} is a {type(item).__name__}, expected an object")
        question, steps, answer = item.get("question"), item.get("steps"), item.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path}: record {i} has no 'question' string")
        if "steps" not in item:
            raise DataError(f"{path}: record {i} has no 'steps' key (a list of strings, [] for none)")
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DataError(f"{path}: record {i}: 'steps' must be a list of strings")
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{path}: record {i} has no 'answer' string")
        for key, text in (("question", question), ("answer", answer), *((f"steps[{j}]", s) for j, s in enumerate(steps))):
            problem = unicode_problem(text)
            if problem:
                raise DataError(f"{path}: record {i}: '{key}' is not valid Unicode text ({problem})")
        records.append(Record(question, tuple(steps), answer))
    return records


def tokenize_record(record: Record, tokenizer) -> TokenizedRecord:
    """Tokenize as the official code does."""
    def enc(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; the official format ends every answer with eos")
    return TokenizedRecord(
        question=enc(record.question + "\n"),
        steps=tuple(enc(step + "\n") for step in record.steps),
        answer=enc("### " + record.answer) + (eos,),
    )


def build_sample(rec: TokenizedRecord, stage: int, rules: StageRules, tokens: SpecialTokens,
                 rng: random.Random | None = None) -> CoconutSample:
    """The training sample of one record at one stage (see the module docstring)."""
    if rules.uniform_prob > 0 and rng is not None and rng.random() < rules.uniform_prob:
        stage = rng.choice(range(len(rec.steps) + 1))
    skip, thoughts = rules.skip_and_thoughts(stage, len(rec.steps))
    rest = [t for step in rec.steps[skip:] for t in step] + list(rec.answer)
    question = list(rec.question)
    if not rules.markers:  # labels start right after the question: its last token opens the suffix
        return CoconutSample(question[:-1], 0, question[-1:] + rest)
    if rules.mode == "pause_as_thought":  # thoughts as ordinary <thought> tokens
        return CoconutSample(question + [tokens.bot] + [tokens.thought] * thoughts, 0, [tokens.eot] + rest)
    return CoconutSample(question + [tokens.bot], thoughts, [tokens.eot] + rest)


def eval_prompt(rec: TokenizedRecord, stage: int, rules: StageRules, tokens: SpecialTokens) -> tuple[list[int], int, bool]:
    """What evaluation feeds the generator: (prompt ids, thoughts, markers). The model writes the rest."""
    thoughts = rules.eval_thoughts(stage, len(rec.steps))
    question = list(rec.question)
    if not rules.markers:
        return question, 0, False
    if rules.mode == "pause_as_thought":
        return question + [tokens.bot] + [tokens.thought] * thoughts + [tokens.eot], 0, False
    return question, thoughts, True


def positions_needed(rec: TokenizedRecord, rules: StageRules, tokens: SpecialTokens,
                     eval_new_tokens: int | None = None) -> int:
    """The most positions a record takes at any stage: its longest training sample and, with
    `eval_new_tokens`, its evaluation prompt and thoughts followed by that many generated tokens."""
    stages = range(max(rules.max_latent_stage + 1, len(rec.steps)) + 1)
    need = max(build_sample(rec, stage, rules, tokens).length for stage in stages)
    if eval_new_tokens is not None:
        for stage in stages:
            prompt, thoughts, markers = eval_prompt(rec, stage, rules, tokens)
            # prompt, <bot> thoughts <eot>, then the new tokens (the last one is never fed back)
            need = max(need, len(prompt) + thoughts + (2 if markers else 0) + eval_new_tokens - 1)
    return need


def extract_answer(text: str) -> str:
    """The official answer extraction: the text after the last '#', commas dropped, stripped."""
    return text.split("#")[-1].replace(",", "").strip()


def batches(samples: Sequence[CoconutSample], batch_size: int, max_batch_tokens: int | None = None,
            ) -> Iterator[list[list[CoconutSample]]]:
    """Batches of `batch_size` samples, each split into micro-batches of at most `max_batch_tokens`
    tokens (packed, no padding); a sample longer than the budget forms its own micro-batch."""
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        if max_batch_tokens is None:
            yield [batch]
            continue
        micro, size, out = [], 0, []
        for s in batch:
            if micro and size + s.length > max_batch_tokens:
                out.append(micro)
                micro, size = [], 0
            micro.append(s)
            size += s.length
        out.append(micro)
        yield out
