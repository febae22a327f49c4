"""Tensors copied file to file (never loaded) read back identical, in any dtype, from several sources."""

from __future__ import annotations

import platform

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.process_memory import return_freed_memory, serve_large_blocks_by_mmap
from llmprune.engine.io.safetensors_copy import copy_tensors, read_header, stored_elements


def test_copied_tensors_read_back_identical(tmp_path):
    generator = torch.Generator().manual_seed(0)
    first = {
        "embed.weight": torch.randn(7, 5, generator=generator),
        "norm.weight": torch.randn(5, generator=generator).to(torch.bfloat16),
    }
    second = {
        "head.weight": torch.randn(3, 5, generator=generator).to(torch.float16),
        "layer.weight": torch.randn(2, 2, generator=generator),
    }
    save_file(first, tmp_path / "a.safetensors")
    save_file(second, tmp_path / "b.safetensors")

    sources = {
        "embed.weight": tmp_path / "a.safetensors",
        "head.weight": tmp_path / "b.safetensors",
        "norm.weight": tmp_path / "a.safetensors",
    }
    elements = copy_tensors(sources, tmp_path / "out.safetensors", metadata={"format": "pt"})

    copied = load_file(tmp_path / "out.safetensors")
    assert sorted(copied) == ["embed.weight", "head.weight", "norm.weight"]  # layer.weight was not asked for
    for name in copied:
        expected = {**first, **second}[name]
        assert copied[name].dtype == expected.dtype and torch.equal(copied[name], expected)
    assert elements == 35 + 15 + 5
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    _, data_start = read_header(tmp_path / "out.safetensors")
    assert data_start % 8 == 0  # the data is aligned as safetensors writes it


def test_element_counts_come_from_the_header(tmp_path):
    save_file(
        {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)},
        tmp_path / "x.safetensors",
        metadata={"format": "pt"},
    )
    assert stored_elements(tmp_path / "x.safetensors") == {"a": 12, "b": 5}


@pytest.mark.parametrize(
    "content", [b"", b"\x05\x00", b"\x04\x00\x00\x00\x00\x00\x00\x00[1,2", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"]
)
def test_damaged_header_is_a_user_error(content, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(UserInputError, match="not a readable safetensors file"):
        read_header(tmp_path / "bad.safetensors")


def test_truncated_source_is_reported(tmp_path):
    save_file({"w": torch.ones(1000)}, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="ends inside tensor w"):
        copy_tensors({"w": tmp_path / "cut.safetensors"}, tmp_path / "out.safetensors")


def test_memory_knobs_apply_on_glibc_and_keep_allocations_working():
    assert serve_large_blocks_by_mmap() is (platform.libc_ver()[0] == "glibc")
    big = torch.ones(4 << 20)
    del big
    return_freed_memory()
    assert torch.ones(3).sum().item() == 3
