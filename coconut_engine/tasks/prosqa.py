"""ProsQA task generators: reachability questions over a random DAG of made-up concepts.

Three distributions, one record format (the official one, with the graph: `idx_to_symbol`, `edges`,
`root`, `target`, `neg_target`):

- `distribution="prosqa"`: ProsQA's own (`prosqa_distribution.py`, from the statistics and names in
  `prosqa_vocabulary.py`): what the main job and the ProsQA recipes train on.
- `distribution="prosqa_small"`: ProsQA's vocabulary, construction and layout on small graphs
  (6-9 concepts, 1-3 steps, about 60 tokens a question): the main job's warm-up.
- `distribution="small"`: small graphs from the size knobs of `ProsQAConfig`, for tests and quick
  runs. Per question: a random DAG over concepts, people attached to concepts, a root person from
  whom a target concept is reachable by a chain of `num_steps` facts, and a distractor concept that
  is not reachable from the root. The question lists every fact in random order and asks
  "Is X a A or B?"; the steps are the chain from the root to the target; the answer "X is a A.".
"""
from __future__ import annotations

import random
import statistics
from collections import deque
from dataclasses import dataclass

from .prosqa_distribution import MEASURED, SMALL_GRAPHS, prosqa_distribution_question

_ONSETS = ["b", "br", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s", "sh", "sk", "st", "t", "tr",
           "v", "w", "y", "z", "zh", "ch", "dr", "fl", "gl", "pl", "scr", "sp", "th", "qu"]
_RHYMES = ["umpus", "impus", "orpus", "empus", "ompus", "erpus", "ampus", "ipus", "opus"]
_PEOPLE = ["Alex", "Tom", "Sally", "Davis", "Max", "Sam", "Polly", "Jack", "Fae", "Rex", "Wren", "Stella", "Sam",
           "Bob", "Eve", "Ivy", "Leo", "Mia", "Nora", "Owen"]


@dataclass(frozen=True)
class ProsQAConfig:
    """Which questions to generate. `distribution="prosqa"` draws every question from ProsQA's own
    measured distribution (`prosqa_distribution.py`; the size knobs below are then unused),
    `"prosqa_small"` from the same construction on small graphs; `"small"` (the default) builds
    small graphs from the knobs, for tests and quick runs."""

    distribution: str = "small"  # small | prosqa | prosqa_small
    num_concepts: int = 8
    num_people: int = 2
    min_steps: int = 2
    max_steps: int = 3
    extra_edges: int = 4
    person_facts: int = 1  # extra "X is a C." facts per person besides the root's chain start
    concept_pool: int | None = None  # draw concept names from this many fixed names (None: ~300)
    # How another person reaches the distractor: False, one fact ("Davis is a yopus.": the distractor is
    # then always a person's own concept and the target never is, a shortcut past the chain); True, a
    # chain as long as the answer's can be (min_steps..max_steps facts), as in ProsQA.
    distractor_chain: bool = False

    def __post_init__(self):
        if self.distribution not in ("small", "prosqa", "prosqa_small"):
            raise ValueError(f"distribution must be 'small', 'prosqa' or 'prosqa_small', got {self.distribution!r}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.num_concepts < self.max_steps + 2:
            raise ValueError(f"num_concepts={self.num_concepts} cannot hold a {self.max_steps}-step chain and a distractor")
        if self.num_people < 1:
            raise ValueError("num_people must be >= 1")
        if self.concept_pool is not None and not self.num_concepts <= self.concept_pool <= len(_ALL_NAMES):
            raise ValueError(f"concept_pool must be in [num_concepts, {len(_ALL_NAMES)}], got {self.concept_pool}")
        if not isinstance(self.distractor_chain, bool):
            raise ValueError(f"distractor_chain must be true or false, got {self.distractor_chain!r}")

    @classmethod
    def official_like(cls) -> "ProsQAConfig":
        """ProsQA's own distribution (vocabulary, graph sizes, chain lengths, question layout)."""
        return cls(distribution="prosqa")


_ALL_NAMES = sorted({onset + rhyme for onset in _ONSETS for rhyme in _RHYMES})
random.Random(1234).shuffle(_ALL_NAMES)


def _concept_names(rng: random.Random, count: int, pool: int | None) -> list[str]:
    return rng.sample(_ALL_NAMES[: pool or len(_ALL_NAMES)], count)


def _distances(edges: dict[int, set[int]], start: int) -> dict[int, int]:
    dist = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in edges.get(node, ()):
            if nxt not in dist:
                dist[nxt] = dist[node] + 1
                queue.append(nxt)
    return dist


def _one_question(rng: random.Random, cfg: ProsQAConfig) -> dict:
    people = rng.sample(sorted(set(_PEOPLE)), cfg.num_people)
    concepts = _concept_names(rng, cfg.num_concepts, cfg.concept_pool)
    symbols = people + concepts
    person_ids = list(range(len(people)))
    concept_ids = list(range(len(people), len(symbols)))
    order = {c: i for i, c in enumerate(rng.sample(concept_ids, len(concept_ids)))}  # topological order
    by_order = sorted(concept_ids, key=order.get)
    steps = rng.randint(cfg.min_steps, cfg.max_steps)
    root = rng.choice(person_ids)

    # The chain root -> c1 -> ... -> c_steps, taken in topological order; the distractor lies outside it.
    positions = sorted(rng.sample(range(len(by_order) - 1), steps))
    chain = [by_order[p] for p in positions]
    target = chain[-1]
    edges: dict[int, set[int]] = {root: {chain[0]}}
    for a, b in zip(chain, chain[1:]):
        edges.setdefault(a, set()).add(b)
    outside = [c for c in concept_ids if c not in chain]
    neg_target = rng.choice(outside)
    # another person reaches the distractor, so it looks like a plausible answer
    others = [p for p in person_ids if p != root]
    if others:
        lead = [rng.choice(others)]
        if cfg.distractor_chain:  # through concepts the root does not reach, earlier in the order
            before = [c for c in by_order if c not in chain and order[c] < order[neg_target]]
            length = min(rng.randint(cfg.min_steps, cfg.max_steps) - 1, len(before))
            lead += [before[i] for i in sorted(rng.sample(range(len(before)), length))]
        for a, b in zip(lead, lead[1:] + [neg_target]):
            edges.setdefault(a, set()).add(b)

    def acceptable() -> bool:
        dist = _distances(edges, root)
        return neg_target not in dist and dist.get(target) == steps

    candidates = [(a, b) for a in concept_ids for b in concept_ids if order[a] < order[b]]
    candidates += [(p, c) for p in person_ids for c in concept_ids]
    rng.shuffle(candidates)
    budget = {"edges": cfg.extra_edges, "people": cfg.person_facts * len(people)}
    for a, b in candidates:
        kind = "people" if a in person_ids else "edges"
        if budget[kind] <= 0 or b in edges.get(a, ()):
            continue
        edges.setdefault(a, set()).add(b)
        if acceptable():
            budget[kind] -= 1
        else:
            edges[a].discard(b)
        if budget["edges"] <= 0 and budget["people"] <= 0:
            break

    edge_list = sorted((a, b) for a, bs in edges.items() for b in bs)
    facts = [_fact(symbols, a, b, a in person_ids) for a, b in edge_list]
    rng.shuffle(facts)
    person = symbols[root]
    options = [symbols[target], symbols[neg_target]]
    rng.shuffle(options)
    path = [root] + chain
    step_texts = [_fact(symbols, a, b, a in person_ids) for a, b in zip(path, path[1:])]
    return {
        "question": " ".join(facts) + f" Is {person} a {options[0]} or {options[1]}?",
        "steps": step_texts,
        "answer": f"{person} is a {symbols[target]}.",
        "idx_to_symbol": symbols,
        "edges": [list(e) for e in edge_list],
        "root": root,
        "target": target,
        "neg_target": neg_target,
    }


def _fact(symbols: list[str], a: int, b: int, is_person: bool) -> str:
    return f"{symbols[a]} is a {symbols[b]}." if is_person else f"Every {symbols[a]} is a {symbols[b]}."


def generate_prosqa(num_questions: int, config: ProsQAConfig | None = None, seed: int = 0) -> list[dict]:
    """`num_questions` records in the official format (deterministic for a seed)."""
    rng = random.Random(seed)
    cfg = config or ProsQAConfig()
    if cfg.distribution in ("prosqa", "prosqa_small"):
        shape = MEASURED if cfg.distribution == "prosqa" else SMALL_GRAPHS
        return [prosqa_distribution_question(rng, shape) for _ in range(num_questions)]
    return [_one_question(rng, cfg) for _ in range(num_questions)]


def prosqa_statistics(records: list[dict]) -> dict[str, float]:
    """Mean and (population) standard deviation of steps, nodes, edges and question words of a
    ProsQA-format record list: keys `steps`, `steps_sd`, `nodes`, `nodes_sd`, ..."""
    sizes = {
        "steps": [len(r["steps"]) for r in records],
        "nodes": [len(r["idx_to_symbol"]) for r in records],
        "edges": [len(r["edges"]) for r in records],
        "question_words": [len(r["question"].split()) for r in records],
    }
    out = {}
    for name, values in sizes.items():
        out[name] = statistics.mean(values)
        out[f"{name}_sd"] = statistics.pstdev(values)
    return out
