"""Peak memory of a layer-streamed prune vs. the in-memory prune, each in its own process.

    python benchmarks/stream_memory.py [--model smollm2-135m] [--share 0.2] [--calib-windows 50]

Both run `llmprune prune` (`prune_pipeline.run_prune`, once with --stream and
once without) on SmolLM2-135M (fp32) to the same parameter target with the
default options (fluctuation scores, global allocation, least-squares
compensation, 50 calibration windows of wikitext-2 validation) and save the
result; the child reports its peak RSS (ru_maxrss) and the RSS it had
after importing torch/transformers (the floor any Python process pays). The
two saved models are compared: same shapes and same logits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from shared_data import CALIBRATION_TEXT  # noqa: E402


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, model_spec: str, out: str, share: float, windows: int, seq_len: int) -> None:
    from llmprune.engine.analysis import CalibrationOptions
    from llmprune.engine.models import ALIASES, alias_path, convert_gguf
    from llmprune.engine.prune_pipeline import PruneConfig, run_prune

    floor = _rss_now()
    # the alias's safetensors conversion (cached), so that both modes read the same directory
    directory = convert_gguf(alias_path(model_spec)) if model_spec in ALIASES else Path(model_spec)
    config = PruneConfig(
        model=str(directory), target_params=str(1 - share), stream=mode == "stream", out=Path(out),
        calibration=CalibrationOptions(dataset=CALIBRATION_TEXT, samples=windows, seq_len=seq_len),
        log_dir=Path(out).parent / f"log-{mode}", device="cpu",
    )
    start = time.perf_counter()
    result = run_prune(config)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "peak_rss": peak, "import_floor_rss": floor, "seconds": seconds, "params_after": result.params_after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--calib-windows", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.share, args.calib_windows, args.seq_len)
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("memory", "stream"):
            out = Path(tmp) / mode
            command = [sys.executable, __file__, "--child", mode, "--out", str(out), "--model", args.model,
                       "--share", str(args.share), "--calib-windows", str(args.calib_windows), "--seq-len", str(args.seq_len)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            line = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
            results[mode] = json.loads(line)
        same = _compare(Path(tmp) / "memory", Path(tmp) / "stream")

    mib = 2**20
    memory, stream = results["memory"], results["stream"]
    print(f"{'mode':<10} {'peak RSS':>10} {'above import floor':>20} {'seconds':>9}")
    for mode, row in results.items():
        print(f"{mode:<10} {row['peak_rss'] / mib:>8.0f}MiB {(row['peak_rss'] - row['import_floor_rss']) / mib:>18.0f}MiB {row['seconds']:>9.1f}")
    print(f"streamed / in-memory peak: {stream['peak_rss'] / memory['peak_rss']:.2f} "
          f"(above the floor: {(stream['peak_rss'] - stream['import_floor_rss']) / (memory['peak_rss'] - memory['import_floor_rss']):.2f})")
    print(f"same model: {same}; parameters after: {memory['params_after']:,} / {stream['params_after']:,}")


def _compare(first: Path, second: Path) -> str:
    import torch

    from llmprune.engine.architecture import layer_shapes
    from llmprune.engine.models import load_model

    a, b = load_model(str(first)).model, load_model(str(second)).model
    ids = torch.randint(0, a.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = float((a(ids).logits - b(ids).logits).abs().max())
    return f"shapes equal: {layer_shapes(a) == layer_shapes(b)}, max |logit difference| {difference:.2e}"


if __name__ == "__main__":
    main()
