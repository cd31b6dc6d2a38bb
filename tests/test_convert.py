"""`coconut-engine data convert` (GSM8K internalized-CoT lines, ProntoQA 5hop_0shot_random.json), max_length,
train_limit / val_limit. The inputs are small hand-written files in the source formats."""
import json

import pytest

from coconut_engine import cli
from coconut_engine.data import load_records, positions_needed
from coconut_engine.tasks import train_task_tokenizer
from coconut_engine.trainer import Trainer, TrainingError
from test_trainer import TASK, tiny

GSM_LINES = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?||<<3+4=7>> #### 7",
    "",
    "A box holds 12 pens. Ann has 2 boxes and gives away 5 pens. How many are left?||<<12*2=24>> <<24-5=19>> #### 19",
    "Bo saves 1,000 dollars a month for 2 months. How much?||<<1000*2=2000>> #### 2,000",
]


def prontoqa_example(i, hops):
    chain = [f"Max is a c{j}." if j % 2 == 0 else f"Every c{j - 1} is a c{j + 1}." for j in range(2 * hops)]
    return {"test_example": {"question": f"Every c0 is a c1. Max is a c0. (example {i})",
                             "query": "True or false: Max is a c2.", "chain_of_thought": chain, "answer": "True"}}


def test_gsm8k_internalized_cot_lines(tmp_path, capsys):
    src = tmp_path / "gsm_train.txt"
    src.write_text("\n".join(GSM_LINES) + "\n")
    assert cli.main(["data", "convert", "gsm8k", str(src), "-o", str(tmp_path / "gsm_train.json")]) == 0
    assert "wrote 3 records" in capsys.readouterr().out
    out = json.loads((tmp_path / "gsm_train.json").read_text())
    assert out[0] == {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
                      "steps": ["<<3+4=7>>"], "answer": "7"}
    assert out[1]["steps"] == ["<<12*2=24>>", "<<24-5=19>>"] and out[2]["answer"] == "2,000"
    assert len(load_records(tmp_path / "gsm_train.json")) == 3  # the trainer reads it
    bad = tmp_path / "bad.txt"
    bad.write_text(GSM_LINES[0] + "\nno separator here #### 3\n")
    with pytest.raises(SystemExit, match=r"bad.txt:2: expected 'question\|\|steps #### answer'"):
        cli.main(["data", "convert", "gsm8k", str(bad), "-o", str(tmp_path / "x.json")])


def test_prontoqa_5hop_file_into_the_official_splits(tmp_path, capsys):
    src = tmp_path / "5hop_0shot_random.json"
    src.write_text(json.dumps({f"example{i}": prontoqa_example(i, 2 + i % 2) for i in range(7)}))
    assert cli.main(["data", "convert", "prontoqa", str(src), "-o", str(tmp_path / "out"), "--splits", "4,2"]) == 0
    sizes = {name: len(json.loads((tmp_path / "out" / f"prontoqa_{name}.json").read_text()))
             for name in ("train", "valid", "test")}
    assert sizes == {"train": 4, "valid": 2, "test": 1}
    first = json.loads((tmp_path / "out" / "prontoqa_train.json").read_text())[0]
    assert first["question"] == "Every c0 is a c1. Max is a c0. (example 0) True or false: Max is a c2."
    assert first["steps"] == ["Max is a c0. Every c0 is a c2.", "Max is a c2. Every c2 is a c4."]
    assert first["answer"] == "True"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"e1": {"test_example": {"question": "q", "query": "x"}}}))
    with pytest.raises(SystemExit, match="broken.json: example 'e1': test_example lacks chain_of_thought, answer"):
        cli.main(["data", "convert", "prontoqa", str(broken), "-o", str(tmp_path / "o2")])


def test_convert_drops_records_longer_than_max_length(tmp_path, capsys):
    src = tmp_path / "gsm.txt"
    src.write_text("\n".join(GSM_LINES))
    tok = tmp_path / "tok"
    train_task_tokenizer(GSM_LINES, tok, vocab_size=300)
    assert cli.main(["data", "convert", "gsm8k", str(src), "-o", str(tmp_path / "all.json"),
                     "--tokenizer", str(tok), "--max-length", "10000"]) == 0
    assert cli.main(["data", "convert", "gsm8k", str(src), "-o", str(tmp_path / "short.json"),
                     "--tokenizer", str(tok), "--max-length", "60"]) == 0
    assert "dropped 1 records longer than 60 tokens (records [1])" in capsys.readouterr().out
    assert [r["answer"] for r in json.loads((tmp_path / "short.json").read_text())] == ["7", "2,000"]
    with pytest.raises(SystemExit, match="needs a tokenizer"):
        cli.main(["data", "convert", "gsm8k", str(src), "-o", str(tmp_path / "x.json"), "--max-length", "9"])


def test_trainer_limits_and_max_length(tmp_path, capsys):
    limited = Trainer(tiny(tmp_path, "a", train_limit=10, val_limit=3))
    assert (len(limited.train_records), len(limited.val_records)) == (10, 3)
    varied = dict(TASK, max_steps=3)  # questions of 2 and 3 steps: samples of different lengths
    full = Trainer(tiny(tmp_path, "b", task_config=varied))
    assert full.max_length == 1024  # default: the model's positions (builtin gpt2-micro)
    lengths = [positions_needed(rec, full.rules, full.tokens) for rec in full.train_tok]
    limit = sorted(set(lengths))[-2]  # drops the longest records
    with pytest.raises(TrainingError, match=f"more than max_length={limit}"):  # reported: an error by default
        Trainer(tiny(tmp_path, "c", max_length=limit, task_config=varied))
    short = Trainer(tiny(tmp_path, "d", max_length=limit, task_config=varied, drop_long_records=True))
    kept = [r for r, n in zip(full.train_records, lengths) if n <= limit]
    assert short.train_records == kept and 0 < len(kept) < len(lengths) and len(short.train_tok) == len(kept)
    assert f"records longer than {limit} positions" in capsys.readouterr().out
