"""Questions drawn from ProsQA's own distribution (vocabulary and statistics in `prosqa_vocabulary`).

One question is a DAG over people and concepts in two parts:

* the part the root person reaches: a chain root -> c1 -> ... -> target of `steps` facts, more
  concepts hung at a breadth-first depth (each with one parent one level up), and extra facts
  u -> v that never shorten a distance from the root (depth(v) <= depth(u) + 1, in a topological
  order), so the chain is a shortest one;
* the part it cannot reach: the other people, a chain from one of them to the distractor, more
  concepts and facts among them, and a few facts pointing into the reachable part (which keeps the
  distractor unreachable from the root).

Target and distractor are leaves. The facts are listed in random order, then
"Is <root> a <A> or <B>?" with the options in random order; the steps are the chain, the answer
"<root> is a <target>.". Records are in the official format with the graph (`idx_to_symbol`,
`edges` sorted by head then tail, `root`, `target`, `neg_target`).

The sizes come from a `ProsQAShape`: `MEASURED` is the split's; `SMALL_GRAPHS` keeps the vocabulary,
construction and layout on graphs a third the size (about 60 tokens a question instead of 210), a
warm-up that teaches a model trained from scratch the question's format at a quarter of the cost.
"""
from __future__ import annotations

import dataclasses
import random

from . import prosqa_vocabulary as vocab


@dataclasses.dataclass(frozen=True)
class ProsQAShape:
    """The size tables one question is drawn from (see `prosqa_vocabulary` for what each means)."""

    steps: dict  # chain length -> probability
    num_people: dict
    distractor_depth: dict
    cross_edges: dict
    concepts_per_question: tuple  # (mean, sd, min, max)
    reachable_concepts: tuple
    depth_profile: tuple
    deeper_than_target: float
    target_extra_parents: dict
    distractor_extra_parents: dict
    extra_reachable_edges: tuple  # (mean, sd)
    extra_unreachable_edges: tuple


MEASURED = ProsQAShape(vocab.STEPS, vocab.NUM_PEOPLE, vocab.DISTRACTOR_DEPTH, vocab.CROSS_EDGES,
                       vocab.CONCEPTS_PER_QUESTION, vocab.REACHABLE_CONCEPTS, vocab.DEPTH_PROFILE,
                       vocab.DEEPER_THAN_TARGET, vocab.TARGET_EXTRA_PARENTS, vocab.DISTRACTOR_EXTRA_PARENTS,
                       vocab.EXTRA_REACHABLE_EDGES, vocab.EXTRA_UNREACHABLE_EDGES)
SMALL_GRAPHS = dataclasses.replace(
    MEASURED, steps={1: 0.2, 2: 0.4, 3: 0.4}, num_people={2: 1.0}, distractor_depth={1: 0.5, 2: 0.5},
    cross_edges={0: 0.5, 1: 0.5}, concepts_per_question=(7, 1.0, 6, 9), reachable_concepts=(4, 1.0, 3, 6),
    extra_reachable_edges=(1.5, 1.0), extra_unreachable_edges=(1.0, 1.0))


def _draw(rng: random.Random, table: dict[int, float]) -> int:
    return rng.choices(list(table), weights=list(table.values()))[0]


def _normal_int(rng: random.Random, spec: tuple, low: int | None = None) -> int:
    mean, sd, *bounds = spec
    lo, hi = (bounds if bounds else (0, None))
    value = round(rng.gauss(mean, sd))
    value = max(value, lo if low is None else max(lo, low))
    return value if hi is None else min(value, hi)


def _linear_extension(rng: random.Random, nodes: list[int], parents: dict[int, set[int]]) -> list[int]:
    """A random topological order of `nodes` (parents outside `nodes` count as placed)."""
    members, placed, order = set(nodes), set(), []
    waiting = list(nodes)
    while waiting:
        ready = [n for n in waiting if not (parents.get(n, set()) & members) - placed]
        pick = rng.choice(ready)
        waiting.remove(pick)
        placed.add(pick)
        order.append(pick)
    return order


def prosqa_distribution_question(rng: random.Random, shape: ProsQAShape = MEASURED) -> dict:
    """One question in the official record format, drawn from ProsQA's construction at `shape`'s sizes."""
    steps = _draw(rng, shape.steps)
    num_people = _draw(rng, shape.num_people)
    neg_depth = min(_draw(rng, shape.distractor_depth), steps)
    n_concepts = _normal_int(rng, shape.concepts_per_question)
    n_reach = min(_normal_int(rng, shape.reachable_concepts, low=steps), n_concepts - neg_depth)
    n_other = n_concepts - n_reach

    # Node ids: people 0..num_people-1 (0 = root, 1 = the distractor's person), then concepts.
    root, neg_person = 0, 1
    reach = list(range(num_people, num_people + n_reach))
    other = list(range(num_people + n_reach, num_people + n_reach + n_other))
    parents: dict[int, set[int]] = {}

    def link(a: int, b: int) -> None:
        parents.setdefault(b, set()).add(a)

    # Reachable part: the chain, then the other concepts at a depth drawn from the profile.
    depth = {root: 0}
    chain = reach[:steps]
    for prev, node in zip([root] + chain, chain):
        link(prev, node)
        depth[node] = depth[prev] + 1
    target = chain[-1]
    weights = [max(w - 1.0, 0.05) for w in shape.depth_profile[:steps]] + [shape.deeper_than_target]
    for node in reach[steps:]:
        level = rng.choices(range(1, steps + 2), weights=weights)[0]
        candidates = [n for n, d in depth.items() if d == level - 1 and n != target]
        if not candidates:  # nothing one level up but the target: hang it at the target's level
            level -= 1
            candidates = [n for n, d in depth.items() if d == level - 1 and n != target]
        link(rng.choice(candidates), node)
        depth[node] = level
    _add_extra_facts(rng, [root] + reach, reach, depth, parents, target, shape.extra_reachable_edges)

    # Unreachable part: a chain from another person to the distractor, then the rest, each concept
    # one level below its parent (every person gets a fact first).
    others_people = list(range(1, num_people))
    neg_chain = other[:neg_depth]
    other_depth = {p: 0 for p in others_people}
    for prev, node in zip([neg_person] + neg_chain, neg_chain):
        link(prev, node)
        other_depth[node] = other_depth[prev] + 1
    neg_target = neg_chain[-1]
    for node in other[neg_depth:]:
        idle = [p for p in others_people if not any(p in ps for ps in parents.values())]
        parent = idle[0] if idle else rng.choice([n for n in other_depth if n != neg_target])
        link(parent, node)
        other_depth[node] = other_depth[parent] + 1
    for person in others_people:  # no concept was left for it: a fact into the reachable part
        if not any(person in ps for ps in parents.values()):
            link(person, rng.choice([n for n in reach if n != target]))
    _add_extra_facts(rng, list(other_depth), other, other_depth, parents, neg_target,
                     shape.extra_unreachable_edges)
    sources = [n for n in other_depth if n != neg_target]
    cross = [(u, v) for u in sources for v in reach if v != target and u not in parents.get(v, ())]
    for u, v in rng.sample(cross, min(_draw(rng, shape.cross_edges), len(cross))):
        link(u, v)

    # The answer nodes' extra parents, from nodes that do not shorten their distance.
    for leaf, table, level, deep in ((target, shape.target_extra_parents, steps, depth),
                                     (neg_target, shape.distractor_extra_parents, neg_depth, other_depth)):
        pool = [n for n, d in deep.items() if d >= level - 1 and n != leaf and n not in parents[leaf]]
        for u in rng.sample(pool, min(_draw(rng, table), len(pool))):
            link(u, leaf)

    return _record(rng, num_people, n_reach + n_other, parents, root, target, neg_target, [root] + chain)


def _add_extra_facts(rng: random.Random, nodes: list[int], heads: list[int], depth: dict[int, int],
                     parents: dict[int, set[int]], leaf: int, spec: tuple) -> None:
    """Extra facts u -> v among `nodes` (v in `heads`, never into or out of `leaf`) that keep the
    graph acyclic (a random topological order) and every breadth-first depth as it is."""
    order = {n: i for i, n in enumerate(_linear_extension(rng, nodes, parents))}
    pairs = [(u, v) for u in nodes for v in heads
             if leaf not in (u, v) and order[u] < order[v] and depth[v] <= depth[u] + 1 and u not in parents.get(v, ())]
    for u, v in rng.sample(pairs, min(_normal_int(rng, spec), len(pairs))):
        parents.setdefault(v, set()).add(u)


def _record(rng: random.Random, num_people: int, num_concepts: int, parents: dict[int, set[int]], root: int,
            target: int, neg_target: int, path: list[int]) -> dict:
    """Name the nodes, renumber them in a random topological order (the two people first) and write
    the question, steps and answer."""
    names = rng.sample(vocab.PEOPLE, num_people) + rng.sample(vocab.CONCEPTS, num_concepts)
    first = [0, 1] if rng.random() < 0.5 else [1, 0]
    rest = _linear_extension(rng, list(range(2, num_people + num_concepts)), parents)
    index = {node: i for i, node in enumerate(first + rest)}
    symbols = [names[node] for node in first + rest]
    edges = sorted(((index[a], index[b]) for b, ps in parents.items() for a in ps), key=lambda e: (e[1], e[0]))

    def fact(a: int, b: int) -> str:
        return f"{names[a]} is a {names[b]}." if a < num_people else f"Every {names[a]} is a {names[b]}."

    facts = [fact(a, b) for b, ps in parents.items() for a in ps]
    rng.shuffle(facts)
    options = [names[target], names[neg_target]]
    rng.shuffle(options)
    return {
        "question": " ".join(facts) + f" Is {names[root]} a {options[0]} or {options[1]}?",
        "steps": [fact(a, b) for a, b in zip(path, path[1:])],
        "answer": f"{names[root]} is a {names[target]}.",
        "idx_to_symbol": symbols,
        "edges": [list(e) for e in edges],
        "root": index[root],
        "target": index[target],
        "neg_target": index[neg_target],
    }
