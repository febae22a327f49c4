"""Proof against the real llama.cpp: exported GGUF files give transformers' perplexity and greedy text.

For the dense SmolLM2-135M and a non-uniformly pruned one (`llmprune prune`
with its defaults: global allocation, lstsq compensation, so output biases):
export f32 and q8_0 GGUF files with `llmprune export`, run `llama-perplexity`
on the wikitext-2 test text, compute the same protocol in transformers, compare
greedy generations (32 tokens, three prompts) and the tokenization of the text.

Protocol (llama-perplexity's): the text is tokenised whole, cut into chunks of
`-c` tokens (`--chunks` of them), and in each chunk only the second half is
scored (positions c/2 .. c-2 predicting the next token); BOS replaces the
first token of a chunk when the tokenizer adds BOS. wiki.test.raw has CRLF line
ends that llama-perplexity reads as bytes and Python's text mode turns into LF:
both sides read one LF copy, or they differ by ~9 % for a reason unrelated
to the export. When llama.cpp's converter is in the tree, the dense model is
also converted by it (f32) as a reference.

    PYTHONPATH=. python benchmarks/llamacpp_check.py --llama-cpp /path/to/llama.cpp

Finds the binaries in --llama-cpp DIR (or $LLAMA_CPP_DIR; DIR, DIR/bin or
DIR/build/bin), else on PATH; without them it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT, REPO

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "The most important thing about machine learning is",
]
TOOLS = ("llama-perplexity", "llama-completion", "llama-tokenize")
# weight repacking picks AMX kernels on CPUs that report AMX; a VM that reports it without enabling it dies with
# SIGILL on q8_0 (this machine did), so the check runs the plain kernels
NO_REPACK = ["--no-repack"]
EOS = "<eos>"  # both sides stop at the end-of-text token and mark it the same way


def find_tools(directory: str | None) -> dict[str, str] | None:
    """Paths of the llama.cpp tools, or None when any is missing."""
    found = {}
    for tool in TOOLS:
        candidates = [Path(directory, sub, tool) for sub in ("", "bin", "build/bin")] if directory else []
        path = next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None) or (
            None if directory else shutil.which(tool)
        )
        if path is None:
            return None
        found[tool] = path
    return found


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=True, **kwargs)


def llama_perplexity(tools: dict, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    out = run(
        [
            tools["llama-perplexity"],
            "-m",
            str(gguf),
            "-f",
            str(text),
            "-c",
            str(ctx),
            "--chunks",
            str(chunks),
            "-t",
            str(threads),
            *NO_REPACK,
        ]
    )
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not match:
        raise RuntimeError(f"no PPL in llama-perplexity output:\n{out.stderr[-2000:]}")
    return float(match.group(1))


def llama_greedy(tools: dict, gguf: Path, prompt: str, tokens: int, threads: int) -> str:
    out = run(
        [
            tools["llama-completion"],
            "-m",
            str(gguf),
            "-p",
            prompt,
            "-n",
            str(tokens),
            "--temp",
            "0",
            "--top-k",
            "1",
            "-no-cnv",
            "--no-warmup",
            "-s",
            "0",
            "-t",
            str(threads),
            "--simple-io",
            "--no-display-prompt",
            *NO_REPACK,
        ],
        stdin=subprocess.DEVNULL,
    )
    text = out.stdout.strip()
    return text.removesuffix("[end of text]").rstrip() + EOS if text.endswith("[end of text]") else text


def llama_token_ids(tools: dict, gguf: Path, text_file: Path) -> list[int]:
    out = run([tools["llama-tokenize"], "-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable", "--no-bos"])
    return json.loads(out.stdout.strip().splitlines()[-1])


def transformers_perplexity(model, tokenizer, text: str, ctx: int, chunks: int) -> float:
    """llama-perplexity's protocol in transformers (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"])
    add_bos = tokenizer("a", add_special_tokens=True)["input_ids"][0] == tokenizer.bos_token_id
    chunks = min(chunks, len(ids) // ctx)
    batch = ids[: chunks * ctx].reshape(chunks, ctx).clone()
    if add_bos:
        batch[:, 0] = tokenizer.bos_token_id
    first = ctx // 2
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, chunks, 8):
            rows = batch[start : start + 8]
            logits = model(rows).logits.float()
            nll = F.cross_entropy(
                logits[:, first : ctx - 1].reshape(-1, logits.shape[-1]),
                rows[:, first + 1 :].reshape(-1),
                reduction="sum",
            )
            total += nll.item()
            count += rows.shape[0] * (ctx - 1 - first)
    return math.exp(total / count)


def transformers_greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1] :].tolist()
    ended = bool(new) and new[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False).strip()
    return text + EOS if ended else text


def llmprune(*args: str) -> None:
    run([sys.executable, "-m", "llmprune", *args], cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--llama-cpp",
        default=os.environ.get("LLAMA_CPP_DIR"),
        help="llama.cpp checkout or build folder (default: $LLAMA_CPP_DIR, else PATH)",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--pruned",
        type=Path,
        default=None,
        help="an llmprune-pruned model folder (default: prune --model with prune's defaults)",
    )
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder for the GGUF files (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "llamacpp_check.json")
    args = parser.parse_args()

    tools = find_tools(args.llama_cpp)
    if tools is None:
        print("llamacpp_check: skipped, no llama.cpp build found (pass --llama-cpp DIR or set LLAMA_CPP_DIR)")
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-check-"))
    work.mkdir(parents=True, exist_ok=True)
    lf_text = work / "wiki.test.lf.txt"  # the one LF copy both sides read
    lf_text.write_bytes(Path(EVALUATION_TEXT).read_bytes().replace(b"\r\n", b"\n"))
    text = lf_text.read_text(encoding="utf-8")

    pruned = args.pruned
    if pruned is None:
        pruned = work / "pruned"
        llmprune("prune", args.model, "--dataset", CALIBRATION_TEXT, "--out", str(pruned), "--json")
    exports = [
        ("pruned", str(pruned), "f32"),
        ("dense", args.model, "f32"),
        ("pruned", str(pruned), "q8_0"),
        ("dense", args.model, "q8_0"),
    ]
    rows, raw = evaluate_exports(exports, tools, work, lf_text, text, args)
    reference = reference_conversion(args, tools, work, lf_text)
    write_results(args, rows, raw, reference, pruned)


def evaluate_exports(exports, tools, work, lf_text, text, args):
    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.io.models import load_model

    rows, raw, cache = [], [], {}
    snippet = work / "snippet.txt"
    snippet.write_text(text[:20000], encoding="utf-8")
    for label, spec, outtype in exports:
        gguf = work / f"{label}-{outtype}.gguf"
        done = work / f"{label}-{outtype}.json"  # a rerun with the same --work resumes after the last finished run
        if done.is_file() and gguf.is_file():
            raw.append(json.loads(done.read_text(encoding="utf-8")))
            rows.append(_row(raw[-1]))
            continue
        started = time.perf_counter()
        llmprune("export", spec, "--gguf", str(gguf), "--outtype", outtype, "--json")
        export_seconds = time.perf_counter() - started
        if spec not in cache:
            loaded = load_model(spec, placement=choose_placement("cpu", "float32"))
            ppl = transformers_perplexity(loaded.model, loaded.tokenizer, text, args.ctx, args.chunks)
            greedy = [transformers_greedy(loaded.model, loaded.tokenizer, p, 32) for p in PROMPTS]
            ids = loaded.tokenizer(text[:20000], add_special_tokens=False)["input_ids"]
            cache[spec] = (ppl, greedy, ids, loaded.num_parameters)
            del loaded
        hf_ppl, hf_greedy, hf_ids, parameters = cache[spec]
        cpp_ppl = llama_perplexity(tools, gguf, lf_text, args.ctx, args.chunks, args.threads)
        cpp_greedy = [llama_greedy(tools, gguf, p, 32, args.threads) for p in PROMPTS]
        same_tokens = llama_token_ids(tools, gguf, snippet) == hf_ids
        same_text = sum(a == b for a, b in zip(cpp_greedy, hf_greedy, strict=False))
        diff = 100 * (cpp_ppl - hf_ppl) / hf_ppl
        raw.append(
            {
                "model": label,
                "spec": spec,
                "outtype": outtype,
                "parameters": parameters,
                "gguf_bytes": gguf.stat().st_size,
                "export_seconds": round(export_seconds, 1),
                "transformers_ppl": hf_ppl,
                "llamacpp_ppl": cpp_ppl,
                "difference_percent": diff,
                "greedy_transformers": hf_greedy,
                "greedy_llamacpp": cpp_greedy,
                "same_greedy": same_text,
                "same_tokenization": same_tokens,
            }
        )
        rows.append(_row(raw[-1]))
        done.write_text(json.dumps(raw[-1]), encoding="utf-8")
        print(json.dumps(raw[-1]), flush=True)
    return rows, raw


def _row(run: dict) -> list:
    return [
        run["model"],
        f"{run['parameters'] / 1e6:.1f} M",
        run["outtype"],
        f"{run['gguf_bytes'] / 2**20:.1f}",
        f"{run['transformers_ppl']:.3f}",
        f"{run['llamacpp_ppl']:.3f}",
        f"{run['difference_percent']:+.3f} %",
        f"{run['same_greedy']}/3",
        "yes" if run["same_tokenization"] else "no",
    ]


def reference_conversion(args, tools, work, lf_text) -> dict | None:
    """The dense model converted by llama.cpp's own convert_hf_to_gguf.py (f32), when the tree has it."""
    root = Path(args.llama_cpp or "")
    converter = next(
        (p for p in (root / "convert_hf_to_gguf.py", root.parent / "convert_hf_to_gguf.py") if p.is_file()), None
    )
    if converter is None:
        return None
    from llmprune.engine.io.models import alias_path, convert_gguf

    source = convert_gguf(alias_path(args.model)) if args.model == "smollm2-135m" else Path(args.model)
    out = work / "dense-reference-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
    run([sys.executable, str(converter), str(source), "--outtype", "f32", "--outfile", str(out)], env=env)
    ppl = llama_perplexity(tools, out, lf_text, args.ctx, args.chunks, args.threads)
    return {"converter": "convert_hf_to_gguf.py --outtype f32", "llamacpp_ppl": ppl}


def write_results(args, rows, raw, reference, pruned) -> None:
    dense = next(r for r in raw if r["model"] == "dense" and r["outtype"] == "f32")
    notes = (
        f"llama-perplexity protocol on one LF copy of wikitext-2 test: `-c {args.ctx} --chunks {args.chunks}`, the"
        " second half of each chunk scored; transformers computes the same on the same tokens. Greedy: 32 tokens for"
        " three prompts (`llama-completion --temp 0 --top-k 1`) against transformers `generate(do_sample=False)`."
        " Tokenization: `llama-tokenize` ids of the first 20,000 characters equal transformers' ids. The pruned model"
        " is `llmprune prune` with its defaults (per-layer shapes, output biases from compensation), exported as"
        " llama.cpp's `deci` architecture."
    )
    if reference:
        gap = 100 * (dense["llamacpp_ppl"] - reference["llamacpp_ppl"]) / reference["llamacpp_ppl"]
        notes += (
            " Reference: the dense model converted by llama.cpp's own `convert_hf_to_gguf.py --outtype f32` gives"
            f" {reference['llamacpp_ppl']:.3f} in llama-perplexity; llmprune's f32 export {dense['llamacpp_ppl']:.3f}"
            f" ({gap:+.3f} %)."
        )
    result = {
        "title": "GGUF export checked against llama.cpp",
        "command": (
            f"PYTHONPATH=. python benchmarks/llamacpp_check.py --llama-cpp LLAMA_CPP_DIR --ctx {args.ctx} --chunks"
            f" {args.chunks}" + (f" --pruned {args.pruned}" if args.pruned else "")
        ),
        "machine": "2-core CPU, 24 GiB",
        "date": datetime.date.today().isoformat(),
        "notes": notes,
        "tables": [
            {
                "caption": "llama.cpp vs transformers on the same tokens",
                "columns": [
                    "model",
                    "parameters",
                    "GGUF type",
                    "file MiB",
                    "transformers PPL",
                    "llama.cpp PPL",
                    "difference",
                    "same greedy 32 tokens",
                    "same tokenization",
                ],
                "rows": rows,
            }
        ],
        "runs": raw,
        "reference": reference,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
