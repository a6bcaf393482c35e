"""Stage folders on disk: a crash at any point leaves the old state or the new."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import checkpoint as ckpt


def make_stage(folder, status: str, tag: str):
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_text(tag)
    ckpt.write_json_atomic(folder / ckpt.MANIFEST, {"stage": "sft", "status": status, "fingerprint": tag, "build_id": tag})
    return folder


def contents(folder) -> str:
    return (folder / "weights.bin").read_text()


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    ckpt.write_json_atomic(path, {"v": 1})

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ckpt.write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}


def test_promote_replaces_the_old_version(tmp_path):
    make_stage(ckpt.final_dir(tmp_path, "sft"), "complete", "old")
    partial = make_stage(ckpt.partial_dir(tmp_path, "sft"), "complete", "new")
    (partial / "checkpoint-4").mkdir()
    final = ckpt.promote(tmp_path, "sft")
    assert contents(final) == "new"
    assert not (final / "checkpoint-4").exists(), "in-stage checkpoints are not part of the result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_promote_refuses_an_incomplete_folder(tmp_path):
    make_stage(ckpt.partial_dir(tmp_path, "sft"), "running", "new")
    with pytest.raises(RuntimeError, match="not complete"):
        ckpt.promote(tmp_path, "sft")


def test_crash_between_the_two_renames_rolls_forward(tmp_path):
    # The old folder was moved aside, then the process died before the new one moved in.
    make_stage(ckpt.old_dir(tmp_path, "sft"), "complete", "old")
    make_stage(ckpt.partial_dir(tmp_path, "sft"), "complete", "new")
    assert "finished installing" in ckpt.recover(tmp_path, "sft")
    assert contents(ckpt.final_dir(tmp_path, "sft")) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_crash_while_old_was_aside_and_new_incomplete_restores_old(tmp_path):
    make_stage(ckpt.old_dir(tmp_path, "sft"), "complete", "old")
    make_stage(ckpt.partial_dir(tmp_path, "sft"), "running", "new")
    assert "restored the previous" in ckpt.recover(tmp_path, "sft")
    assert contents(ckpt.final_dir(tmp_path, "sft")) == "old"
    assert ckpt.partial_dir(tmp_path, "sft").exists(), "the interrupted attempt stays resumable"


def test_crash_after_the_manifest_but_before_any_rename_rolls_forward(tmp_path):
    make_stage(ckpt.final_dir(tmp_path, "sft"), "complete", "old")
    make_stage(ckpt.partial_dir(tmp_path, "sft"), "complete", "new")
    ckpt.recover(tmp_path, "sft")
    assert contents(ckpt.final_dir(tmp_path, "sft")) == "new"


def test_crash_after_both_renames_cleans_up(tmp_path):
    make_stage(ckpt.final_dir(tmp_path, "sft"), "complete", "new")
    make_stage(ckpt.old_dir(tmp_path, "sft"), "complete", "old")
    assert ckpt.recover(tmp_path, "sft") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_a_running_partial_never_looks_complete(tmp_path):
    partial = make_stage(ckpt.partial_dir(tmp_path, "sft"), "running", "new")
    assert not ckpt.is_complete(partial)
    (partial / ckpt.MANIFEST).write_text('{"status": "comp')  # torn by a crash
    assert ckpt.read_manifest(partial) is None and not ckpt.is_complete(partial)
    assert ckpt.recover(tmp_path, "sft") is None
    assert not ckpt.final_dir(tmp_path, "sft").exists()


def test_latest_checkpoint_ignores_half_written_ones(tmp_path):
    for step in (3, 6, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.bin").write_text("w")
    ckpt.mark_checkpoint_complete(tmp_path / "checkpoint-3")
    ckpt.mark_checkpoint_complete(tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert sorted(ckpt.discard_unfinished_checkpoints(tmp_path)) == ["checkpoint-9", "checkpoint-notanumber"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_hash_cache_reads_once_and_notices_changes(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("one\n")
    cache = ckpt.HashCache(tmp_path / "hashes.json")
    first = cache(data)
    assert first.startswith("sha256:") and cache(data) == first
    cache.save()
    assert ckpt.HashCache(tmp_path / "hashes.json")(data) == first, "the cache survives a restart"
    data.write_text("two\n")
    assert cache(data) != first


def test_folder_hash_uses_our_manifest_or_content(tmp_path):
    stage = make_stage(tmp_path / "ours", "complete", "abc")
    cache = ckpt.HashCache(None)
    assert cache(stage) == "checkpoint:abc:abc"
    plain = tmp_path / "theirs"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    before = cache(plain)
    (plain / "extra.bin").write_text("x")
    assert before.startswith("sha256:") and cache(plain) != before


def test_fingerprint_is_order_independent():
    assert ckpt.fingerprint_of({"a": 1, "b": {"c": 2}}) == ckpt.fingerprint_of({"b": {"c": 2}, "a": 1})
    assert ckpt.fingerprint_of({"a": 1}) != ckpt.fingerprint_of({"a": 2})
