"""Peak memory of a layer-streamed prune vs. the in-memory prune, each in its own process.

    python benchmarks/stream_memory.py [--model smollm2-135m] [--share 0.2] [--calib-windows 50]
    python benchmarks/stream_memory.py --synthetic 1536,4096,24 --calib-windows 16   # a 0.68 B model

Both run `llmprune prune` (`prune_pipeline.run_prune`, once with --stream and
once without) on SmolLM2-135M (fp32), or a synthetic model, to the same parameter target with the
default options (fluctuation scores, global allocation, least-squares
compensation, 50 calibration windows of wikitext-2 validation) and save the
result; the child reports its peak RSS (VmHWM) and the RSS it had
after importing torch/transformers (the floor any Python process pays). The
two saved models are compared: same shapes and same logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_file import RESULTS, table, this_command, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT  # noqa: E402

TITLE = "Peak memory of a layer-streamed prune vs. the in-memory prune"
NOTES = (
    "The same default prune (`--share` of all parameters, default 0.2; fluctuation scores, global allocation,"
    " least-squares compensation) in two fresh processes, each saving its result; peak RSS is the process's high-water"
    " mark (VmHWM), the import floor the RSS after importing torch and transformers. Both saved models are compared:"
    " same shapes, same logits. One row pair per model; each run of the script replaces its model's rows."
)


def _peak_rss() -> int:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: after fork + exec that also counts the parent's
    RSS at fork time, which would charge the child for the synthetic model the parent built."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, model_spec: str, out: str, share: float, windows: int, seq_len: int) -> None:
    from llmprune.engine.io.models import ALIASES, alias_path, convert_gguf
    from llmprune.engine.pruning.analysis import CalibrationOptions
    from llmprune.engine.pruning.pipeline import PruneConfig, run_prune

    floor = _rss_now()
    # the alias's safetensors conversion (cached), so that both modes read the same directory
    directory = convert_gguf(alias_path(model_spec)) if model_spec in ALIASES else Path(model_spec)
    config = PruneConfig(
        model=str(directory),
        target_params=str(1 - share),
        stream=mode == "stream",
        out=Path(out),
        calibration=CalibrationOptions(dataset=CALIBRATION_TEXT, samples=windows, seq_len=seq_len),
        log_dir=Path(out).parent / f"log-{mode}",
        device="cpu",
    )
    start = time.perf_counter()
    result = run_prune(config)
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    print(
        json.dumps(
            {
                "mode": mode,
                "peak_rss": peak,
                "import_floor_rss": floor,
                "seconds": seconds,
                "params_after": result.params_after,
                "params_before": result.params_before,
                "model_bytes": result.model_bytes,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--calib-windows", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--synthetic",
        default=None,
        metavar="HIDDEN,INTERMEDIATE,LAYERS",
        help=(
            "instead of --model: a randomly initialised Llama of this shape (SmolLM2's vocabulary, "
            "tokenizer and 3:1 GQA with 64-wide heads), to see how the peaks grow with the model"
        ),
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make-synthetic", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_synthetic:
        _synthetic_model(args.make_synthetic, Path(args.out))
        return
    if args.child:
        child(args.child, args.model, args.out, args.share, args.calib_windows, args.seq_len)
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            # built in its own process, so that this one stays small
            args.model = str(Path(tmp) / "synthetic")
            subprocess.run(
                [sys.executable, __file__, "--make-synthetic", args.synthetic, "--out", args.model],
                check=True,
                capture_output=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        for mode in ("memory", "stream"):
            out = Path(tmp) / mode
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--out",
                str(out),
                "--model",
                args.model,
                "--share",
                str(args.share),
                "--calib-windows",
                str(args.calib_windows),
                "--seq-len",
                str(args.seq_len),
            ]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            line = (
                subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                .stdout.strip()
                .splitlines()[-1]
            )
            results[mode] = json.loads(line)
        same = _compare(Path(tmp) / "memory", Path(tmp) / "stream")

    mib = 2**20
    memory, stream = results["memory"], results["stream"]
    print(
        f"model: {args.synthetic and f'synthetic {args.synthetic} ' or ''}{memory['params_before']:,} parameters, "
        f"{memory['model_bytes'] / mib:.0f} MiB of weights"
    )
    print(f"{'mode':<10} {'peak RSS':>10} {'above import floor':>20} {'seconds':>9}")
    for mode, row in results.items():
        print(
            f"{mode:<10} {row['peak_rss'] / mib:>8.0f}MiB {(row['peak_rss'] - row['import_floor_rss']) / mib:>18.0f}MiB"
            f" {row['seconds']:>9.1f}"
        )
    print(
        f"streamed / in-memory peak: {stream['peak_rss'] / memory['peak_rss']:.2f} (above the floor:"
        f" {(stream['peak_rss'] - stream['import_floor_rss']) / (memory['peak_rss'] - memory['import_floor_rss']):.2f})"
    )
    print(f"same model: {same}; parameters after: {memory['params_after']:,} / {stream['params_after']:,}")
    label = f"synthetic {args.synthetic}" if args.synthetic else args.model
    _save(label, {"command": this_command(), "same_model": same, "calib_windows": args.calib_windows, **results})


def _save(label: str, run: dict) -> None:
    """Keep the other models' runs of benchmarks/results/stream_memory.json, replace this one's."""
    path = RESULTS / "stream_memory.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    runs[label] = run
    mib = 2**20
    rows = []
    for name, entry in sorted(runs.items()):
        memory, stream = entry["memory"], entry["stream"]
        weights = (
            f"{name} ({memory['model_bytes'] / mib:,.0f} MiB of weights, {entry['calib_windows']} calibration windows)"
        )
        for mode in ("memory", "stream"):
            row = entry[mode]
            rows.append(
                [
                    weights,
                    "in memory" if mode == "memory" else "streamed",
                    round(row["peak_rss"] / mib),
                    round((row["peak_rss"] - row["import_floor_rss"]) / mib),
                    round(row["seconds"]),
                ]
            )
        above = (stream["peak_rss"] - stream["import_floor_rss"]) / (memory["peak_rss"] - memory["import_floor_rss"])
        rows.append(
            [weights, "streamed / in memory", round(stream["peak_rss"] / memory["peak_rss"], 2), round(above, 2), None]
        )
    write_results(
        "stream_memory",
        title=TITLE,
        notes=NOTES,
        command="\n".join(entry["command"] for _, entry in sorted(runs.items())),
        tables=[
            table("Peak RSS", ["model", "mode", "peak RSS (MiB)", "above the import floor (MiB)", "seconds"], rows)
        ],
        runs=runs,
    )


def _synthetic_model(shape: str, directory: Path) -> Path:
    """A random Llama with SmolLM2's vocabulary and tokenizer, saved as safetensors (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprune.engine.io.checkpoint import save_model
    from llmprune.engine.io.models import load_model

    hidden, intermediate, layers = (int(v) for v in shape.split(","))
    tokenizer = load_model("smollm2-135m").tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 192,
        head_dim=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(config), tokenizer, directory)
    return directory


def _compare(first: Path, second: Path) -> str:
    import torch

    from llmprune.engine.io.architecture import layer_shapes
    from llmprune.engine.io.models import load_model

    a, b = load_model(str(first)).model, load_model(str(second)).model
    ids = torch.randint(0, a.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = float((a(ids).logits - b(ids).logits).abs().max())
    return f"shapes equal: {layer_shapes(a) == layer_shapes(b)}, max |logit difference| {difference:.2e}"


if __name__ == "__main__":
    main()
