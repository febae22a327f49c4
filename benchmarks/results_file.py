"""Writing a benchmark's results file in the schema that benchmarks/render_docs.py renders.

    from results_file import table, write_results
    write_results("my_bench", title="...", tables=[table("caption", ["a", "b"], [[1, 2]])], raw_rows=rows)

then `make docs` regenerates docs/benchmarks.md. The command defaults to the
one that is running (`python benchmarks/x.py ARGS`), the machine to this one.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def table(caption: str, columns: list[str], rows: list[list[Any]], notes: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"caption": caption, "columns": list(columns), "rows": [list(row) for row in rows]}
    if notes:
        out["notes"] = notes
    return out


def this_machine() -> str:
    """'2-core CPU, 24 GiB' (Linux: from /proc/meminfo); a GPU is named by the caller if one was used."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    described = f"{cores}-core CPU"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                described += f", {round(int(line.split()[1]) / 2**20)} GiB"
    except OSError:
        pass
    return described


def this_command() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def earlier_run(path: Path, append: bool) -> tuple[list[dict[str, Any]], str]:
    """The rows a run with `--append` starts from (those of `path`, else none) and its command: the earlier
    run's command lines, then this one's."""
    earlier = json.loads(path.read_text()) if append and path.exists() else None
    rows = list(earlier["rows"]) if earlier else []
    return rows, (earlier["command"] + "\n" if earlier else "") + this_command()


def write_results(
    name: str,
    *,
    title: str,
    tables: list[dict[str, Any]],
    notes: str | None = None,
    command: str | None = None,
    machine: str | None = None,
    date: str | None = None,
    path: Path | None = None,
    **raw: Any,
) -> Path:
    """Write benchmarks/results/<name>.json (or `path`) atomically: a run cut short keeps the last complete file."""
    data: dict[str, Any] = {
        "title": title,
        "command": command or this_command(),
        "machine": machine or this_machine(),
        "date": date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }
    if notes:
        data["notes"] = notes
    data["tables"] = tables
    data.update(raw)
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path
