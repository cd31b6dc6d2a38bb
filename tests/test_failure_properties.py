"""Issue 18, property tests: generated malformed configs, index files, data records and JSONL
requests reach the parsers, and only the project's error types come out, naming file, record or key."""
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coconut_engine import CheckpointError, ConfigError, ModelConfig
from coconut_engine.data import DataError, load_records
from coconut_engine.loader import INDEX_FILE, weight_files
from coconut_engine.requests import read_requests
from coconut_engine.trainer import TrainConfig, TrainingError
from test_config import LLAMA32_HUB, QWEN25_HUB

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scalars = st.none() | st.booleans() | st.integers(-10**13, 10**13) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100, "n_positions": 64,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "eos_token_id": 1}
EXTRA_KEYS = ["rope_scaling", "rope_parameters", "head_dim", "eos_token_id", "bos_token_id", "layer_types",
              "hidden_act", "sliding_window", "use_sliding_window", "attention_bias", "mlp_bias", "model_type"]


def read_back(directory: Path, name: str, content) -> Path:
    path = directory / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


@SETTINGS
@given(base=st.sampled_from([QWEN25_HUB, LLAMA32_HUB, GPT2]), data=st.data())
def test_malformed_model_configs_are_config_errors_naming_the_key(base, data):
    key = data.draw(st.sampled_from(sorted(set(base) | set(EXTRA_KEYS))), label="key")
    raw = dict(base)
    if data.draw(st.booleans(), label="delete"):
        raw.pop(key, None)
    else:
        raw[key] = data.draw(json_values, label="value")
    try:
        config = ModelConfig.from_dict(raw, source="bad/config.json")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("bad/config.json"), message
        named = [key] if key in raw else [key, "missing required field", "model_type"]
        if key in ("rope_scaling", "rope_parameters"):
            named += ["rope"]
        assert any(name in message for name in named), (key, message)
    else:
        assert config.hidden_size >= 1 and config.head_dim >= 1 and config.num_heads % config.num_kv_heads == 0


@SETTINGS
@given(content=json_values | st.binary(max_size=40))
def test_any_config_file_content_is_a_config_error_naming_the_file(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = read_back(Path(tmp), "config.json", content)
        try:
            ModelConfig.from_file(path)
        except ConfigError as exc:
            assert str(path) in str(exc)


shard_names = st.sampled_from(["../up.safetensors", "/abs.safetensors", "a/b.safetensors", "", "..", ".",
                               "ok.safetensors"]) | st.text(max_size=10)


@SETTINGS
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=8), shard_names | json_values, max_size=4)}) | st.binary(max_size=40))
def test_malformed_index_files_are_checkpoint_errors_naming_the_index(index):
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        path = read_back(model_dir, INDEX_FILE, index)
        try:
            weight_files(model_dir)
        except CheckpointError as exc:
            assert str(path) in str(exc)
        else:
            raise AssertionError(f"no error for an index whose shards do not exist: {index!r}")


record_fields = st.fixed_dictionaries({}, optional={"question": json_values | st.text(max_size=10),
                                                    "steps": json_values | st.lists(st.text(max_size=5), max_size=3),
                                                    "answer": json_values | st.text(max_size=10)})


@SETTINGS
@given(records=st.lists(record_fields | json_values, max_size=4) | json_values | st.binary(max_size=40))
def test_malformed_data_records_are_data_errors_naming_file_and_record(records):
    with tempfile.TemporaryDirectory() as tmp:
        path = read_back(Path(tmp), "train.json", records)
        try:
            loaded = load_records(path)
        except DataError as exc:
            message = str(exc)
            assert str(path) in message
            if isinstance(records, list) and records:
                assert "record " in message, message
        else:
            assert len(loaded) == len(records) and all(r.question.strip() and r.answer.strip() for r in loaded)


request_lines = (st.fixed_dictionaries({}, optional={"prompt": json_values | st.text(max_size=8),
                                                     "question": json_values | st.text(max_size=8),
                                                     "num_thoughts": json_values | st.integers(-2, 5)})
                 .map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=12))


@SETTINGS
@given(lines=st.lists(request_lines, max_size=4), tail=st.binary(max_size=6))
def test_malformed_jsonl_requests_are_data_errors_naming_file_and_line(lines, tail):
    with tempfile.TemporaryDirectory() as tmp:
        path = read_back(Path(tmp), "q.jsonl", "\n".join(lines).encode() + tail)
        try:
            requests = read_requests(path)
        except DataError as exc:
            message = str(exc)
            assert str(path) in message
            if not message.endswith("no prompts") and "not UTF-8" not in message:  # a line's fault: its number
                assert re.match(rf"{re.escape(str(path))}:\d+: ", message), message
        else:
            assert requests and all(isinstance(r.prompt, str) for r in requests)
            assert all(r.num_thoughts is None or r.num_thoughts >= 0 for r in requests)


train_keys = st.sampled_from(sorted(f.name for f in __import__("dataclasses").fields(TrainConfig)))


@SETTINGS
@given(key=train_keys, value=json_values | st.text(max_size=8), as_string=st.booleans())
def test_malformed_train_configs_are_training_errors_naming_the_key(key, value, as_string):
    values = {key: str(value) if as_string else value}  # the command line gives strings, YAML typed values
    try:
        TrainConfig.from_dict(values, source="run.yaml")
    except TrainingError as exc:
        message = str(exc)
        assert message.startswith("run.yaml: ") and key in message, (key, value, message)
