"""Reading SFT data: formats, the held-out split, and a one-line error per bad row."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError
from stages.shared import data


def rows_of(path):
    return [data.sft_example(where, row) for where, row in data.read_rows(str(path), "sft.data.train")]


def error_of(path) -> str:
    with pytest.raises(ConfigError) as e:
        rows_of(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_prompt_response_rows_become_chat_pairs(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi?", "response": "Hello!", "task": "greeting"}) + "\n\n"
        + json.dumps({"prompt": "Sum 1 and 2.", "completion": "3", "system": "Be brief."}) + "\n"
    )
    first, second = rows_of(path)
    assert first == {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello!"}]}
    assert second["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 1 and 2."}]
    assert second["completion"] == [{"role": "assistant", "content": "3"}]


def test_conversations_learn_the_last_assistant_turn(tmp_path):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    (row,) = rows_of(path)
    assert row["prompt"] == messages[:3] and row["completion"] == messages[3:]


def test_json_array_and_parquet(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows, indent=2))
    assert [r["completion"][0]["content"] for r in rows_of(array)] == ["a0", "a1", "a2"]
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(rows_of(lines)) == 3

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert [r["prompt"][0]["content"] for r in rows_of(parquet)] == ["q0", "q1", "q2"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": }'], ":2: invalid JSON: Expecting value (column 29)"),
        (['["a", "b"]'], ":1: expected a JSON object, got list"),
        (['{"prompt": "a", "answer": "b"}'], ":1: expected keys 'prompt' and 'response' (or 'messages'); found: answer, prompt"),
        (['{"prompt": "a", "response": "  "}'], ":1: 'response' is empty"),
        (['{"prompt": 5, "response": "b"}'], ":1: 'prompt' must be a string, got int"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], ":1: 'messages' must end with an assistant turn (the response to learn)"),
        (['{"messages": [{"role": "assistant", "content": "a"}]}'], ":1: 'messages' has no user turn before the final assistant turn"),
        (['{"messages": [{"role": "bot", "content": "a"}]}'], ":1: messages[0] has role 'bot' (expected one of system, user, assistant)"),
        (['{"messages": [{"role": "user"}]}'], ":1: messages[0] must be an object with 'role' and 'content'"),
        (['{"messages": []}'], ":1: 'messages' must be a non-empty list of {'role', 'content'} objects"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "response": "c"}'],
         ":1: has both 'messages' and response; give one form of the example"),
        (['{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "response": "c"}'],
         ":1: 'prompt' ends with an assistant turn, which the response would follow as a second one; end it with the user's turn"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert error_of(path) == f"{path}{expected}"


def test_bad_item_in_json_array_names_its_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c", "response": ""}\n]\n')
    assert error_of(path) == f"{path}:3: 'response' is empty"
    path.write_text('[\n  {"prompt": "a", "response": "b"}\n  {"prompt": "c"}\n]\n')
    assert error_of(path) == f"{path}:3: invalid JSON: expected ',' or ']' between array items"


def test_empty_and_unsupported_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert error_of(empty) == f"{empty}: no rows"
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,response\n")
    assert error_of(csv) == f"sft.data.train: {csv}: unsupported file type .csv (use .jsonl, .json, .jsonl.gz, .json.gz or .parquet)"


def test_gzipped_json_lines_read_like_plain_ones(tmp_path):
    import gzip

    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    packed = tmp_path / "rows.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert data.read_rows(str(packed), "sft.data.train") == [(f"{packed}:1", rows[0]), (f"{packed}:2", rows[1])]
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"prompt": "a"}\n')
    assert error_of(fake).startswith(f"{fake}: not a gzip file")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"prompt": "a", "response": "b"}\n{"prompt": oops}\n'))
    assert error_of(broken).startswith(f"{broken}:2: invalid JSON")


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "response": "b"}\n')
    assert rows_of(path)[0]["completion"][0]["content"] == "b"


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"prompt": "a", "response": "b"}\n{"prompt": "caf\u00e9", "response": "ok"}\n'.encode("latin-1"))
    assert error_of(latin) == f"{latin}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_hub_dataset_failure_is_one_clear_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError) as e:
        data.read_rows("someone/some-sft-set:train", "sft.data.train")
    assert str(e.value) == "sft.data.train: 'someone/some-sft-set:train' is not a local file, and loading it as a Hub dataset failed: Couldn't reach the Hub"


def test_split_is_fixed_by_seed_and_disjoint():
    rows = list(range(50))
    train, held = data.split_rows(rows, None, 0.1, seed=3, key="k")
    assert len(held) == 5 and len(train) == 45 and not set(train) & set(held)
    assert data.split_rows(rows, None, 0.1, seed=3, key="k") == (train, held)
    assert data.split_rows(rows, None, 0.1, seed=4, key="k")[1] != held
    assert data.split_rows(rows, [99], 0.1, seed=3, key="k") == (rows, [99])
    with pytest.raises(ConfigError, match="too few"):
        data.split_rows([1], None, 0.5, seed=0, key="k")
