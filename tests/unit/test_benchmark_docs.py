"""docs/benchmarks.md is generated from benchmarks/results/*.json, and is current."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO_ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_docs = _load("render_docs")


def test_docs_benchmarks_md_is_current():
    committed = (REPO_ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert committed == render_docs.render(), "docs/benchmarks.md is stale: run `make docs` and commit it"


def test_every_results_file_has_the_schema_and_a_section():
    results = render_docs.load_results()  # raises ResultsError naming the file
    assert {name for name, _ in results} == {
        path.name for path in (REPO_ROOT / "benchmarks" / "results").glob("*.json")
    }
    rendered = render_docs.render()
    for name, data in results:
        assert f"`benchmarks/results/{name}`" in rendered and data["command"].strip() in rendered


def _write(directory, name, **data):
    (directory / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")


def test_render_is_generic_and_deterministic(tmp_path):
    base = {"command": "python benchmarks/x.py --n 2", "machine": "2-core CPU, 24 GiB", "date": "2026-12-01"}
    _write(tmp_path, "b_second", title="Second", **base, tables=[], raw=[1, 2, 3])
    _write(
        tmp_path,
        "a_first",
        title="First | piped",
        **base,
        notes="Why it *matters*.",
        tables=[
            {
                "caption": "sizes",
                "columns": ["model", "params", "PPL", "ok"],
                "rows": [["dense", 134515008, 53.96462, True], ["pruned", 107529984, None, False]],
            },
        ],
    )
    text = render_docs.render(tmp_path)
    assert text == render_docs.render(tmp_path)
    assert text.index("## First") < text.index("## Second")  # by file name
    assert "| model | params | PPL | ok |\n|---|---:|---:|---|\n" in text
    assert "| dense | 134,515,008 | 53.96 | yes |" in text and "| pruned | 107,529,984 | – | no |" in text
    assert "## First \\| piped" not in text and "Why it *matters*." in text
    assert "[1, 2, 3]" not in text  # raw fields are not rendered


@pytest.mark.parametrize(
    "broken",
    [
        {"title": "t", "machine": "m", "date": "d", "tables": []},  # no command
        {"title": "t", "command": "c", "machine": "m", "date": "d", "tables": [{"columns": ["a", "b"], "rows": [[1]]}]},
    ],
)
def test_a_file_off_the_schema_is_named(tmp_path, broken):
    _write(tmp_path, "bad", **broken)
    with pytest.raises(render_docs.ResultsError, match="bad.json"):
        render_docs.render(tmp_path)


def test_results_file_helper_writes_what_the_renderer_reads(tmp_path, monkeypatch):
    results_file = _load("results_file")
    monkeypatch.setattr(results_file, "RESULTS", tmp_path)
    path = results_file.write_results(
        "demo", title="Demo", tables=[results_file.table("t", ["a"], [[1]])], rows=[{"a": 1}]
    )
    data = json.loads(path.read_text())
    assert data["rows"] == [{"a": 1}] and data["command"].startswith("python ") and len(data["date"]) == 10
    assert "| a |\n|---:|\n| 1 |" in render_docs.render(tmp_path)
