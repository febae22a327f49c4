import json

import pytest
import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.data import (
    calibration_and_held_out,
    check_text_source,
    evaluation_windows,
    load_calibration_windows,
    load_text,
    random_windows,
    tokenize,
)


def test_txt_is_read_exactly(tmp_path):
    text = "  first line\n\n second = 2 \n"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    assert load_text(str(path)) == text


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n", encoding="utf-8")
    assert load_text(str(path)) == "one\n\ntwo"


def test_jsonl_without_text_field_is_user_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="line 1"):
        load_text(str(path))


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"]}), path)
    assert load_text(str(path)) == "alpha\n\nbeta"


def test_pydoc_is_real_prose_offline():
    text = load_text("pydoc")
    assert len(text) > 100_000
    assert "the" in text


def test_missing_dataset_is_user_error():
    with pytest.raises(UserInputError, match="not found"):
        load_text("/definitely/not/here.txt")


@pytest.mark.parametrize("purpose,example", [("train", "wiki.valid.tokens"), ("eval", "wiki.test.raw")])
def test_uncached_named_dataset_offline_fails_at_once_with_a_local_example(purpose, example, monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    before = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(UserInputError, match="cannot be reached and it is not in the local cache") as caught:
        load_text("wikitext2", purpose)
    # calibration and training text is never suggested from the test split
    assert example in caught.value.hint
    # the cache-only switch is put back afterwards
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


def test_evaluation_windows_are_consecutive_and_drop_the_tail():
    ids = torch.arange(103)
    windows = evaluation_windows(ids, 10)
    assert windows.ids.shape == (10, 10)
    assert torch.equal(windows.ids.flatten(), ids[:100])
    assert len(evaluation_windows(ids, 10, max_windows=3)) == 3


@pytest.mark.parametrize("seq_len,max_windows", [(0, None), (1, None), (10, 0), (10, -1)])
def test_bad_window_arguments(seq_len, max_windows):
    with pytest.raises(UserInputError):
        evaluation_windows(torch.arange(100), seq_len, max_windows)


def test_random_windows_are_seeded_and_inside_the_stream():
    ids = torch.arange(1000)
    first = random_windows(ids, 8, 16, seed=3)
    again = random_windows(ids, 8, 16, seed=3)
    other = random_windows(ids, 8, 16, seed=4)
    assert torch.equal(first.ids, again.ids)
    assert not torch.equal(first.ids, other.ids)
    # each window is a contiguous slice of the stream
    assert torch.all(first.ids[:, 1:] - first.ids[:, :-1] == 1)


def test_tokenize_is_cached_and_identical(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    text = load_text("pydoc")[:20000]
    first = tokenize(tiny_tokenizer, text)
    assert list((tmp_path / "tokens").glob("*.pt")), "the token ids were not cached"
    second = tokenize(tiny_tokenizer, text)
    assert torch.equal(first, second)
    assert torch.equal(first, torch.tensor(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]))


def _two_texts(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    # counting, so that every window of tokens occurs once in its text
    first.write_text(" ".join(str(i) for i in range(3000)), encoding="utf-8")
    second.write_text(", ".join(f"item {i}" for i in range(3000)), encoding="utf-8")
    return first, second


def test_several_sources_give_equal_numbers_of_windows_from_each(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    first, second = _two_texts(tmp_path)
    mixed = load_calibration_windows(tiny_tokenizer, f"{first}, {second}", 5, 16, seed=2)
    alone = [
        load_calibration_windows(tiny_tokenizer, str(path), n, 16, seed=2) for path, n in ((first, 3), (second, 2))
    ]
    assert len(mixed) == 5 and mixed.source == f"{first},{second}"
    # the first source takes the odd window; each part is exactly that source's own seeded windows
    assert torch.equal(mixed.ids, torch.cat([alone[0].ids, alone[1].ids]))
    assert load_text(f"{first},{second}") == load_text(str(first)) + "\n\n" + load_text(str(second))


def test_held_out_windows_share_no_token_with_the_calibration_windows_of_their_source(
    tiny_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    first, second = _two_texts(tmp_path)
    source = f"{first},{second}"
    cut, held = calibration_and_held_out(tiny_tokenizer, source, 4, 6, 16, seed=0)
    assert torch.equal(cut.ids, load_calibration_windows(tiny_tokenizer, source, 4, 16, seed=0).ids)
    assert len(held) == 6
    for path, cut_rows, held_rows in ((first, cut.ids[:2], held.ids[:3]), (second, cut.ids[2:], held.ids[3:])):
        stream = tokenize(tiny_tokenizer, load_text(str(path), "train")).tolist()

        def start(row, stream=stream):  # where a window sits in its own source's token stream
            return next(i for i in range(len(stream)) if stream[i : i + 16] == row.tolist())

        cut_starts = [start(row) for row in cut_rows]
        for row in held_rows:
            assert all(abs(start(row) - other) >= 16 for other in cut_starts)


def test_held_out_windows_may_come_from_another_text_and_still_avoid_the_cut(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    first, second = _two_texts(tmp_path)
    cut, held = calibration_and_held_out(
        tiny_tokenizer, str(first), 4, 6, 16, seed=0, held_out_source=f"{first},{second}"
    )
    assert torch.equal(cut.ids, load_calibration_windows(tiny_tokenizer, str(first), 4, 16, seed=0).ids)
    assert len(held) == 6 and held.source == f"{first},{second}"
    streams = [tokenize(tiny_tokenizer, load_text(str(path), "train")).tolist() for path in (first, second)]

    def starts(row, stream):
        return [i for i in range(len(stream) - 15) if stream[i : i + 16] == row.tolist()]

    cut_starts = [starts(row, streams[0])[0] for row in cut.ids]
    for row in held.ids[:3]:  # the cut's own text: never overlapping a cut window
        assert all(abs(starts(row, streams[0])[0] - other) >= 16 for other in cut_starts)
    assert all(starts(row, streams[1]) for row in held.ids[3:])  # the other text: its own windows


def test_each_of_several_sources_is_checked():
    with pytest.raises(UserInputError, match="no-such-file.txt"):
        check_text_source("pydoc,no-such-file.txt")
