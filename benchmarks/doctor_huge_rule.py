"""The doctor's "huge" rule on a real model: no false alarm when healthy, and the scale it catches.

    python benchmarks/doctor_huge_rule.py [--model smollm2-135m] [--layer 12]

Scans the model once (tensor by tensor, as `llmprune doctor` does), reports the
largest layer-to-layer spread of max |w| among healthy tensors of one kind and
what the rule flags on the healthy model, then scales one tensor of each kind
by 10, 100, 1e3 and 1e4 and reports whether the rule flags it (and nothing else).
Also times the scan and a full `run_doctor` with the forward test.
"""

from __future__ import annotations

import argparse
import time

import torch
from results_file import table, write_results

from llmprune.engine.diagnose.doctor import DoctorConfig, run_doctor
from llmprune.engine.diagnose.tensor_scan import (
    HUGE_ABSOLUTE,
    HUGE_RELATIVE,
    huge_tensors,
    largest_spread,
    tensor_stats,
)
from llmprune.engine.io.weight_source import iter_tensors, locate_weights

FACTORS = (10.0, 100.0, 1e3, 1e4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=12, help="the layer whose tensors are scaled")
    args = parser.parse_args()

    source = locate_weights(args.model)
    start = time.perf_counter()
    tensors = dict(iter_tensors(source))
    stats = {name: tensor_stats(name, tensor) for name, tensor in tensors.items()}
    scan_seconds = time.perf_counter() - start
    kind, spread = largest_spread(list(stats.values()))
    healthy_flags = huge_tensors(list(stats.values()))
    print(
        f"{args.model}: {sum(s.numel for s in stats.values()):,} parameters in {len(stats)} tensors, scanned in"
        f" {scan_seconds:.2f} s"
    )
    print(
        f"rule: max|w| >= {HUGE_RELATIVE:g}x median of the same kind in other layers (and >= 1), or >="
        f" {HUGE_ABSOLUTE:g}"
    )
    print(f"largest healthy spread: {spread:.2f}x in {kind}")
    print(f"flagged on the healthy model: {len(healthy_flags)}")

    targets = [name for name in stats if f"layers.{args.layer}." in name]
    targets += [name for name in stats if "layers." not in name]
    print("\n| tensor | max abs | " + " | ".join(f"x{factor:g}" for factor in FACTORS) + " |")
    print("|---|---:|" + "---|" * len(FACTORS))
    rows = []
    for name in targets:
        cells = []
        for factor in FACTORS:
            scaled = dict(stats)
            scaled[name] = tensor_stats(name, tensors[name] * factor)
            flagged = [flag.stats.name for flag in huge_tensors(list(scaled.values()))]
            cells.append("flagged" if flagged == [name] else "-" if not flagged else f"other: {flagged}")
        print(f"| {name} | {stats[name].max_abs:.3g} | " + " | ".join(cells) + " |")
        rows.append([name.removeprefix("model."), float(f"{stats[name].max_abs:.3g}"), *cells])

    start = time.perf_counter()
    report = run_doctor(DoctorConfig(model=args.model, test_forward=True))
    print(
        f"\nrun_doctor(--test-forward): {time.perf_counter() - start:.2f} s, exit code {report.exit_code}, "
        f"{len(report.findings)} findings, torch threads {torch.get_num_threads()}"
    )
    doctor_seconds = time.perf_counter() - start
    write_results(
        "doctor_huge_rule",
        title=f'doctor\'s "huge" rule on {args.model}: no false alarm, and the scale it catches',
        notes=(
            f"Rule: a tensor is flagged when its max |w| is >= {HUGE_RELATIVE:g}x the median max |w| of the same kind"
            " in the "
            f"other layers (and >= 1), or >= {HUGE_ABSOLUTE:g}. On the healthy model"
            f" ({sum(s.numel for s in stats.values()):,} "
            f"parameters in {len(stats)} tensors, scanned in {scan_seconds:.2f} s) the largest spread of one kind is "
            f"{spread:.2f}x ({kind}) and {len(healthy_flags)} tensors are flagged. Each row scales one tensor of layer "
            f'{args.layer}, or one tensor without peers, at a time; "flagged" means it and nothing else was flagged. '
            f"`run_doctor(--test-forward)`: {doctor_seconds:.2f} s, exit code {report.exit_code},"
            f" {len(report.findings)} findings."
        ),
        tables=[table("Scaling one tensor", ["tensor", "max |w|", *(f"x{factor:g}" for factor in FACTORS)], rows)],
        healthy={"flagged": len(healthy_flags), "largest_spread": spread, "kind": kind, "scan_seconds": scan_seconds},
        doctor={"seconds": doctor_seconds, "exit_code": report.exit_code, "findings": len(report.findings)},
    )


if __name__ == "__main__":
    main()
