"""The official evaluation's scores of one generation (facebookresearch/coconut run.py).

The official loop decodes the whole output (question, markers skipped, generated text) and takes the
answer after the last '#' and the chain of thought as everything after the question's line up to the
first '#'. The engine's generator returns the generated text alone, so the CoT is its text before the
first '#'; the reference CoT is the record's steps joined by newlines.
"""
from __future__ import annotations

from dataclasses import dataclass

from .coconut import SPECIAL_TOKEN_TEXTS
from .data import extract_answer


@dataclass(frozen=True)
class GenerationScore:
    """Answer exact match, CoT exact match, generated tokens and thoughts of one answered question."""

    answer_correct: bool
    cot_correct: bool
    tokens: int
    thoughts: int


def extract_cot(text: str) -> str:
    """The generated reasoning: the text before the first '#', markers removed, stripped."""
    for marker in SPECIAL_TOKEN_TEXTS:
        text = text.replace(marker, "")
    return text.split("#")[0].strip()


def score_generation(text: str, answer: str, steps: tuple[str, ...] | list[str], tokens: int,
                     thoughts: int) -> GenerationScore:
    """Score one generated text against a record's answer and steps as the official eval does."""
    return GenerationScore(answer_correct=extract_answer(text) == answer.replace(",", "").strip(),
                           cot_correct=extract_cot(text) == "\n".join(steps),
                           tokens=tokens, thoughts=thoughts)


def summarize(scores: list[GenerationScore]) -> dict:
    """Accuracy (answer EM), CoT EM, mean generated tokens and mean thoughts per answer."""
    n = max(len(scores), 1)
    return {"accuracy": sum(s.answer_correct for s in scores) / n,
            "cot_accuracy": sum(s.cot_correct for s in scores) / n,
            "tokens_per_answer": sum(s.tokens for s in scores) / n,
            "thoughts_per_answer": sum(s.thoughts for s in scores) / n}
