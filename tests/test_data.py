"""Official data format, tokenization and the curriculum stage builder (table-driven), task generator."""
import json
import os
import random
from collections import deque
from pathlib import Path

import pytest

from coconut_engine.coconut import SpecialTokens
from coconut_engine.data import (DataError, Record, StageRules, batches, build_sample, eval_prompt, extract_answer,
                                 load_records, tokenize_record)
from coconut_engine.tasks import ProsQAConfig, generate_prosqa, prosqa_statistics, prosqa_vocabulary


def _find_prosqa_valid() -> Path:
    """`COCONUT_PROSQA_VALID`, else `shared/data/prosqa_valid.json` beside the checkout or a folder above it."""
    if os.environ.get("COCONUT_PROSQA_VALID"):
        return Path(os.environ["COCONUT_PROSQA_VALID"])
    here = Path(__file__).resolve()
    found = [p / "shared" / "data" / "prosqa_valid.json" for p in here.parents[1:4]]
    return next((p for p in found if p.is_file()), found[0])


PROSQA_VALID = _find_prosqa_valid()
TOKENS = SpecialTokens(bot=1001, thought=1002, eot=1003)
EOS = 1000


class WordTokenizer:
    """One id per character: enough to check the official tokenization layout exactly."""

    eos_token_id = EOS

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 997 for c in text]


def records_real_and_generated():
    records = [Record(r["question"], tuple(r["steps"]), r["answer"]) for r in generate_prosqa(3, seed=5)]
    if PROSQA_VALID.is_file():
        records += load_records(PROSQA_VALID)[:3]
    return records


def test_tokenization_follows_the_official_layout():
    rec = Record("Is Tom a wumpus?", ("Tom is a yumpus.", "Every yumpus is a wumpus."), "Tom is a wumpus.")
    tok = tokenize_record(rec, WordTokenizer())
    enc = WordTokenizer().encode
    assert list(tok.question) == enc("Is Tom a wumpus?\n")
    assert [list(s) for s in tok.steps] == [enc("Tom is a yumpus.\n"), enc("Every yumpus is a wumpus.\n")]
    assert list(tok.answer) == enc("### Tom is a wumpus.") + [EOS]


# (mode, stage, c, max_latent_stage, pad) -> (steps skipped, thoughts, markers)
CASES = [
    ("coconut", 0, 1, 6, False, lambda n: (0, 0, True)),
    ("coconut", 2, 1, 6, False, lambda n: (2, 2, True)),
    ("coconut", 2, 2, 6, False, lambda n: (2, 4, True)),
    ("coconut", 5, 1, 6, False, lambda n: (5, 5, True)),  # stage <= max: n thoughts even past the steps
    ("coconut", 7, 1, 6, False, lambda n: (n, min(n, 6), True)),  # past max: all steps, min(steps, max)
    ("coconut", 7, 1, 6, True, lambda n: (n, 6, True)),  # past max, padded to max
    ("coconut", 9, 2, 3, True, lambda n: (n, 6, True)),
    ("coconut", 9, 2, 3, False, lambda n: (n, 2 * min(n, 3), True)),
    ("cot", 4, 1, 6, False, lambda n: (0, 0, False)),
    ("no_cot", 4, 1, 6, False, lambda n: (n, 0, False)),
    ("no_thoughts", 2, 1, 6, False, lambda n: (2, 0, True)),
    ("pause_as_thought", 2, 1, 6, False, lambda n: (2, 2, True)),
]


@pytest.mark.parametrize("mode,stage,c,max_stage,pad,expect", CASES)
def test_stage_builder_rules(mode, stage, c, max_stage, pad, expect):
    rules = StageRules(c_thought=c, max_latent_stage=max_stage, pad_latent_to_max=pad, mode=mode)
    for record in records_real_and_generated():
        rec = tokenize_record(record, WordTokenizer())
        skip, thoughts, markers = expect(len(rec.steps))
        sample = build_sample(rec, stage, rules, TOKENS)
        rest = [t for s in rec.steps[min(skip, len(rec.steps)):] for t in s] + list(rec.answer)
        question = list(rec.question)
        if not markers:
            assert sample.prompt + sample.suffix == question + rest and sample.num_thoughts == 0
            assert sample.suffix[1:] == rest  # labels start right after the question
        elif mode == "pause_as_thought":
            assert sample.prompt == question + [TOKENS.bot] + [TOKENS.thought] * thoughts
            assert sample.num_thoughts == 0 and sample.suffix == [TOKENS.eot] + rest
        else:
            assert sample.prompt == question + [TOKENS.bot]
            assert sample.num_thoughts == thoughts
            assert sample.suffix == [TOKENS.eot] + rest


def test_uniform_prob_draws_stages_with_a_fixed_seed():
    rules = StageRules(uniform_prob=1.0, max_latent_stage=6)
    rec = tokenize_record(records_real_and_generated()[0], WordTokenizer())
    draws = [build_sample(rec, 0, rules, TOKENS, random.Random(i)).num_thoughts for i in range(40)]
    again = [build_sample(rec, 0, rules, TOKENS, random.Random(i)).num_thoughts for i in range(40)]
    assert draws == again
    assert set(draws) == set(range(len(rec.steps) + 1))  # uniform over 0..steps
    half = StageRules(uniform_prob=0.5, max_latent_stage=6)
    mixed = [build_sample(rec, 1, half, TOKENS, random.Random(i)).num_thoughts for i in range(60)]
    assert mixed.count(1) > 10 and len(set(mixed)) > 2


def test_eval_prompt():
    rec = tokenize_record(records_real_and_generated()[0], WordTokenizer())
    assert eval_prompt(rec, 2, StageRules(), TOKENS) == (list(rec.question), 2, True)
    assert eval_prompt(rec, 2, StageRules(mode="no_cot"), TOKENS) == (list(rec.question), 0, False)
    prompt, k, markers = eval_prompt(rec, 2, StageRules(mode="pause_as_thought"), TOKENS)
    assert prompt[-4:] == [TOKENS.bot, TOKENS.thought, TOKENS.thought, TOKENS.eot] and (k, markers) == (0, False)
    assert extract_answer("Tom is a x.\n### Tom is a wumpus, ok.") == "Tom is a wumpus ok."


@pytest.mark.parametrize("content,message", [
    ("", "not valid JSON"), ("[]", "holds no records"), ('{"a": 1}', "expected a JSON list"),
    ('[{"question": "q", "steps": [], "answer": "a"}, {"question": "q", "steps": "x", "answer": "a"}]',
     "record 1: 'steps' must be a list"),
    ('[{"question": "q", "steps": []}]', "record 0 has no 'answer'"),
    ('[3]', "record 0 is a int"),
    ('[{"question": "q", "answer": "a"}]', "record 0 has no 'steps' key"),
    ("[" * 100000 + "]" * 100000, "not valid JSON .*recursion"),  # deeper than Python's stack
    ('[{"question": "q \\ud800", "steps": [], "answer": "a"}]', r"record 0: 'question' is not valid Unicode text"),
    ('[{"question": "q", "steps": ["s", "\\udfff"], "answer": "a"}]', r"record 0: 'steps\[1\]' is not valid Unicode"),
])
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(path)
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "missing.json")


def test_contradicting_rules():
    with pytest.raises(DataError, match="uniform_prob=0.5 has no meaning in mode cot"):
        StageRules(uniform_prob=0.5, mode="cot")
    with pytest.raises(DataError, match="mode 'latent'"):
        StageRules(mode="latent")
    with pytest.raises(DataError, match="c_thought must be >= 1"):
        StageRules(c_thought=0)


def test_token_budget_batches():
    from coconut_engine.coconut import CoconutSample

    samples = [CoconutSample([1] * n, 0, [2, 3]) for n in (5, 9, 3, 20, 4)]
    out = list(batches(samples, 4, max_batch_tokens=16))
    assert [[[s.length for s in micro] for micro in batch] for batch in out] == [[[7], [11, 5], [22]], [[6]]]
    assert [[len(micro) for micro in batch] for batch in batches(samples, 4)] == [[4], [1]]


def _distances(edges: list[list[int]], start: int) -> dict[int, int]:
    children = {}
    for x, y in edges:
        children.setdefault(x, []).append(y)
    dist, queue = {start: 0}, deque([start])
    while queue:
        x = queue.popleft()
        for y in children.get(x, ()):
            if y not in dist:
                dist[y] = dist[x] + 1
                queue.append(y)
    return dist


SMALL_PROSQA = ProsQAConfig(distribution="prosqa_small")


@pytest.mark.parametrize("config", [ProsQAConfig(), ProsQAConfig(distractor_chain=True), ProsQAConfig.official_like(),
                                    SMALL_PROSQA], ids=["small", "small-distractor-chain", "prosqa", "prosqa_small"])
def test_generator_is_deterministic_and_consistent(config):
    a, b = generate_prosqa(20, config, seed=3), generate_prosqa(20, config, seed=3)
    assert a == b and a != generate_prosqa(20, config, seed=4)
    for r in a:
        symbols, root, target = r["idx_to_symbol"], r["root"], r["target"]
        dist = _distances(r["edges"], root)
        assert r["neg_target"] not in dist  # the distractor is unreachable
        assert dist[target] == len(r["steps"])  # the steps are a shortest chain
        assert r["answer"] == f"{symbols[root]} is a {symbols[target]}."
        assert r["question"].endswith("?") and symbols[r["neg_target"]] in r["question"].split("Is ")[-1]


def test_small_task_distractor_is_a_persons_own_concept_unless_reached_by_a_chain():
    """The small task's one-fact distractor is always another person's own concept and the target never
    is the asked person's (a shortcut past the chain); with `distractor_chain` another person reaches
    it through concepts the root does not reach, as many facts as a chain of the answer can have."""
    def own_concepts(r, asked: bool):
        people = [i for i, s in enumerate(r["idx_to_symbol"]) if s[0].isupper()]
        return {y for x, y in r["edges"] if x in people and (x == r["root"]) == asked}

    task = dict(num_concepts=7, extra_edges=2, person_facts=0, min_steps=2, max_steps=3, concept_pool=24)
    one_fact = generate_prosqa(300, ProsQAConfig(**task), seed=5)
    assert all(r["neg_target"] in own_concepts(r, False) and r["target"] not in own_concepts(r, True)
               for r in one_fact)
    chained = generate_prosqa(300, ProsQAConfig(**task, distractor_chain=True), seed=5)
    direct = sum(r["neg_target"] in own_concepts(r, False) for r in chained)
    assert direct < 0.35 * len(chained)  # only where no concept precedes the distractor outside the chain
    for r in chained:
        people = [i for i, s in enumerate(r["idx_to_symbol"]) if s[0].isupper() and i != r["root"]]
        reach = [d for d in (_distances(r["edges"], p).get(r["neg_target"]) for p in people) if d is not None]
        assert reach and min(reach) <= 3 and r["neg_target"] not in _distances(r["edges"], r["root"])
    with pytest.raises(ValueError, match="distractor_chain must be true or false, got 'yes'"):
        ProsQAConfig(distractor_chain="yes")


@pytest.mark.parametrize("config", [ProsQAConfig.official_like(), SMALL_PROSQA], ids=["prosqa", "prosqa_small"])
def test_prosqa_distribution_graphs_have_prosqa_structure(config):
    """What every ProsQA question has (measured on the split, true of all 300): target and distractor
    are leaves, every concept has a parent and every person a fact, another person reaches the
    distractor in no more steps than the chain, the edge list is sorted by head, the facts are the
    edges, and the steps walk the edges. The small-graph warm-up keeps all of it."""
    for r in generate_prosqa(200, config, seed=7):
        symbols, edges = r["idx_to_symbol"], r["edges"]
        people = [i for i, s in enumerate(symbols) if s in prosqa_vocabulary.PEOPLE]
        concepts = [i for i, s in enumerate(symbols) if s in prosqa_vocabulary.CONCEPTS]
        assert len(people) + len(concepts) == len(symbols) == len(set(symbols)) and set(people) == {0, 1} | set(people)
        heads = {x for x, _ in edges}
        assert r["target"] not in heads and r["neg_target"] not in heads
        assert {y for _, y in edges} == set(concepts) and set(people) <= heads
        reach = [_distances(edges, p).get(r["neg_target"]) for p in people if p != r["root"]]
        assert min(d for d in reach if d is not None) <= len(r["steps"])
        assert edges == sorted(edges, key=lambda e: (e[1], e[0]))
        facts = r["question"].rsplit(" Is ", 1)[0]
        written = [f"{symbols[x]} is a {symbols[y]}." if x in people else f"Every {symbols[x]} is a {symbols[y]}."
                   for x, y in edges]
        assert sorted(f + "." for f in facts[:-1].split(". ")) == sorted(written)
        assert set(r["steps"]) <= set(written)


@pytest.mark.skipif(not PROSQA_VALID.is_file(), reason="shared/data/prosqa_valid.json is absent")
def test_prosqa_distribution_matches_the_real_validation_split():
    """Mean and spread of node count, fact count, chain length and question length within 10 %, and
    the same concept and people name sets (in the vocabulary module and in what is generated)."""
    real_records = json.loads(PROSQA_VALID.read_text())
    ours_records = generate_prosqa(1000, ProsQAConfig.official_like(), seed=0)
    real, ours = prosqa_statistics(real_records), prosqa_statistics(ours_records)
    for key in ("nodes", "edges", "steps", "question_words"):
        for stat in (key, f"{key}_sd"):
            assert abs(ours[stat] - real[stat]) <= 0.1 * real[stat], (stat, ours[stat], real[stat])

    def names(records, upper: bool) -> set[str]:
        return {s for r in records for s in r["idx_to_symbol"] if s[0].isupper() == upper}

    assert names(real_records, True) == set(prosqa_vocabulary.PEOPLE) == names(ours_records, True)
    assert names(real_records, False) == set(prosqa_vocabulary.CONCEPTS) == names(ours_records, False)


def test_prosqa_small_is_prosqa_on_a_third_of_the_graph():
    """The warm-up distribution: ProsQA's names only, 1-3 steps, under half the nodes and facts and
    about a third of the words of a ProsQA-distribution question."""
    full = prosqa_statistics(generate_prosqa(500, ProsQAConfig.official_like(), seed=1))
    small_records = generate_prosqa(500, SMALL_PROSQA, seed=1)
    small = prosqa_statistics(small_records)
    for key in ("nodes", "edges"):
        assert small[key] < 0.5 * full[key], (key, small[key], full[key])
    assert 0.2 * full["question_words"] < small["question_words"] < 0.45 * full["question_words"]
    assert {len(r["steps"]) for r in small_records} == {1, 2, 3}
    names = {s for r in small_records for s in r["idx_to_symbol"]}
    assert names <= set(prosqa_vocabulary.PEOPLE + prosqa_vocabulary.CONCEPTS)
    assert set(prosqa_vocabulary.CONCEPTS) <= names  # 500 questions use every concept name


@pytest.mark.skipif(not PROSQA_VALID.is_file(), reason="shared/data/prosqa_valid.json is absent")
def test_no_generated_question_is_a_validation_question():
    """The main job's whole generated set (train + held-out, its seed), for the prosqa task and the
    default small one, shares no question with the split."""
    from coconut_engine.main_job import COMMON, PROSQA_COMMON, PROSQA_WARMUP

    real = {r["question"] for r in json.loads(PROSQA_VALID.read_text())}
    assert PROSQA_COMMON["task_config"]["distribution"] == "prosqa"
    warmup = dict(task_config=PROSQA_WARMUP.task_config, task_train_size=PROSQA_WARMUP.task_train_size,
                  task_val_size=PROSQA_COMMON["task_val_size"])
    for common in (PROSQA_COMMON, COMMON, warmup):
        size = common["task_train_size"] + common["task_val_size"]
        ours = generate_prosqa(size, ProsQAConfig(**common["task_config"]), seed=0)
        assert not real & {r["question"] for r in ours}


def test_unknown_distribution_is_a_clear_error():
    with pytest.raises(ValueError, match="distribution must be 'small', 'prosqa' or 'prosqa_small', got 'prosq'"):
        ProsQAConfig(distribution="prosq")
