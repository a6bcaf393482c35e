"""Reading training data, with every bad row reported as `file:line: problem`.

Sources are JSONL, JSON (an array of objects, or JSON lines), Parquet, or a
`datasets` Hub id written `org/name` or `org/name:split`. Rows come back with where
they came from, so the stage-specific checks can name the line at fault.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

from engine.chat import encode_prompt
from pipeline.config import ConfigError, resolve_local

ROLES = ("system", "user", "assistant")


def read_rows(source: str, key: str) -> list[tuple[str, dict]]:
    """[(where, row)] from a file or a Hub dataset; `key` names the setting in errors."""
    path = resolve_local(source)
    if path is None:
        return _read_hub(source, key)
    if not path.is_file():
        raise ConfigError(f"{key}: no such file: {source}")
    compressed = path.suffix.lower() == ".gz"
    suffix = Path(path.stem).suffix.lower() if compressed else path.suffix.lower()
    if suffix == ".parquet" and not compressed:
        return _read_parquet(path)
    if suffix in (".jsonl", ".json"):
        text = read_text(path, compressed)
        if suffix == ".json" and text.lstrip().startswith("["):
            return _read_json_array(path, text)
        return _read_json_lines(path, text)
    raise ConfigError(f"{key}: {source}: unsupported file type {(''.join(path.suffixes[-2:]) if compressed else path.suffix) or '(none)'} (use .jsonl, .json, .jsonl.gz, .json.gz or .parquet)")


def read_text(path: Path, compressed: bool = False) -> str:
    """A data file's text (gunzipped if `compressed`), or a ConfigError naming the line
    that is not UTF-8 or saying the file is not gzip."""
    raw = path.read_bytes()
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ConfigError(f"{path}: not a gzip file ({e})") from None
    try:
        return raw.decode("utf-8-sig")  # the BOM some Windows editors write is not part of the first row
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None


def _read_json_lines(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{number}", row))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def _read_json_array(path: Path, text: str) -> list[tuple[str, dict]]:
    """Decode a JSON array one element at a time, to know each object's line."""
    decoder = json.JSONDecoder()
    rows, pos = [], text.index("[") + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip(pos)
    while pos < len(text) and text[pos] != "]":
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{line_of(pos)}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{line_of(pos)}", row))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise ConfigError(f"{path}:{line_of(pos)}: invalid JSON: expected ',' or ']' between array items")
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ConfigError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}") from None
    return [(f"{path}: row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _read_hub(source: str, key: str) -> list[tuple[str, dict]]:
    import datasets

    name, _, split = source.partition(":")
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise ConfigError(f"{key}: {source!r} is not a local file, and loading it as a Hub dataset failed: {str(e).splitlines()[0][:300]}") from None
    return [(f"{source} row {i + 1}", row) for i, row in enumerate(table)]


def split_rows(rows: list, eval_rows: list | None, eval_fraction: float, seed: int, key: str) -> tuple[list, list]:
    """Train and held-out rows: the given eval set, or a fixed-seed random slice of train."""
    if eval_rows is not None:
        return rows, eval_rows
    n_eval = len(rows) - rows_left_to_train(len(rows), eval_fraction, key)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def rows_left_to_train(n: int, eval_fraction: float, key: str) -> int:
    """How many of `n` rows train once split_rows holds out its share: known from the
    count alone, so a stage's check can refuse too few rows before anything trains."""
    left = n - max(1, math.ceil(n * eval_fraction))
    if left < 1:
        raise ConfigError(f"{key}: {n} row(s) are too few to carve off a held-out split; give more rows or an eval file")
    return left


# ---------------------------------------------------------------- prompts


def read_prompts(source: str, key: str, max_length: int | None = None, tokenizer=None) -> list[list[dict]]:
    """Chat prompts from rows with "prompt" (text or messages) or "messages" (a
    trailing assistant turn is dropped). With a tokenizer, a prompt longer than
    `max_length` tokens is an error naming its line."""
    prompts = []
    for where, row in read_rows(source, key):
        if "prompt" in row:
            prompt = row["prompt"]
            messages = messages_field(where, prompt, "prompt") if isinstance(prompt, list) else [{"role": "user", "content": text_field(where, prompt, "prompt")}]
        elif "messages" in row:
            messages = messages_field(where, row["messages"], "messages")
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            raise ConfigError(f"{where}: expected a 'prompt' (or 'messages'); found keys: {', '.join(sorted(row)) or 'none'}")
        if not messages:
            raise ConfigError(f"{where}: the prompt has no turns")
        if tokenizer is not None:
            n = len(encode_prompt(tokenizer, messages))
            if n > max_length:
                raise ConfigError(f"{where}: the prompt is {n} tokens, over {key.split('.')[0]}.max_prompt_length={max_length}")
        prompts.append(messages)
    return prompts


# ---------------------------------------------------------------- SFT rows


def sft_example(where: str, row: dict) -> dict:
    """A prompt-response row in conversational prompt-completion form:
    {"prompt": [messages...], "completion": [{"role": "assistant", ...}]}.

    Accepts {"prompt", "response"} (or "completion"), with an optional "system",
    and {"messages": [...]} ending with the assistant turn to learn; other keys are ignored.
    """
    if "messages" in row and {"prompt", "response", "completion"} & set(row):
        both = ", ".join(sorted({"prompt", "response", "completion"} & set(row)))
        raise ConfigError(f"{where}: has both 'messages' and {both}; give one form of the example")
    if "messages" in row:
        messages = messages_field(where, row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: 'messages' must end with an assistant turn (the response to learn)")
        if not any(m["role"] == "user" for m in messages[:-1]):
            raise ConfigError(f"{where}: 'messages' has no user turn before the final assistant turn")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    response_key = "response" if "response" in row else "completion" if "completion" in row else None
    if "prompt" not in row or response_key is None:
        found = ", ".join(sorted(row)) or "none"
        raise ConfigError(f"{where}: expected keys 'prompt' and 'response' (or 'messages'); found: {found}")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt = messages_field(where, prompt, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise ConfigError(f"{where}: 'prompt' ends with an assistant turn, which the response would follow as a second one; end it with the user's turn")
    else:
        prompt = [{"role": "user", "content": text_field(where, prompt, "prompt")}]
    system = row.get("system")
    if system is not None:
        prompt = [{"role": "system", "content": text_field(where, system, "system")}] + prompt
    response = text_field(where, row[response_key], response_key)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": response}]}


def text_field(where: str, value, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{where}: '{key}' is empty")
    return value


def messages_field(where: str, value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ConfigError(f"{where}: {key}[{i}] has role {message['role']!r} (expected one of {', '.join(ROLES)})")
        messages.append({"role": message["role"], "content": text_field(where, message["content"], f"{key}[{i}].content")})
    return messages
