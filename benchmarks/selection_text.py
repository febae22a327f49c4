"""Which text can the searched allocation select on? KL to the dense model on several texts against PPL.

    python benchmarks/selection_text.py --allocations benchmarks/results/search_assembly.json
    python benchmarks/selection_text.py --allocations benchmarks/results/selection_text.json  # the same ones again

The search ranks allocations by KL to the dense model on its selection windows. This checks that
ranking against what is evaluated: SmolLM2-135M at 20 % of all parameters, every allocation put
into one level database (cut on the default's 64 wikitext-2 validation windows, each layer refitted
on dense inputs, as the search sees it), then per allocation the mean per-token KL to the dense
model on 64 windows × 128 tokens of each text, and PPL on the first --eval-windows windows of
wikitext-2 test and of pydoc. The texts:

- `wiki.valid held-out`: what `--allocation search` selects on by default (windows of the
  calibration text that share no token with the cut's);
- `wiki test, 2nd half`: windows of the evaluation text's second half (the PPL windows are the
  first ones): a check only, nothing is ever selected on it;
- `licenses`: the licence texts of /usr/share/common-licenses (legal prose, neither evaluated nor
  calibrated on);
- `vim manual`: Vim's user manual, /usr/share/vim/vim90/doc/usr_*.txt (software documentation).

Allocations: the uniform one, the default's global ranking put on the ladder, and every searched
allocation recorded in the --allocations results files (rows with `levels`).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import table, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT, wiki_and_pydoc_windows  # noqa: E402

from llmprune.engine.data import calibration_and_held_out, load_text, random_windows, tokenize  # noqa: E402
from llmprune.engine.evaluate import perplexity  # noqa: E402
from llmprune.engine.io.models import load_model  # noqa: E402
from llmprune.engine.pruning.allocate.level import Level  # noqa: E402
from llmprune.engine.pruning.cut.level_database import LevelDatabase  # noqa: E402
from llmprune.engine.pruning.search_path import global_start, search_space  # noqa: E402
from llmprune.engine.walk.layer_store import runner_for  # noqa: E402

LICENSES = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if Path(p).is_file())
VIM_MANUAL = sorted(glob.glob("/usr/share/vim/vim90/doc/usr_*.txt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--allocations", type=Path, nargs="+", required=True, help="results files with searched `levels`"
    )
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    cut, held = calibration_and_held_out(tokenizer, CALIBRATION_TEXT, 64, args.windows, 128, 0)
    test = tokenize(tokenizer, load_text(EVALUATION_TEXT, "eval"))

    def joined(paths: list[str]) -> torch.Tensor:
        return tokenize(tokenizer, "\n\n".join(Path(p).read_text(errors="replace") for p in paths))

    texts = {
        "wiki.valid held-out": held.ids,
        "wiki test, 2nd half": random_windows(test[test.numel() // 2 :], args.windows, 128, 3).ids,
        "licenses": random_windows(joined(LICENSES), args.windows, 128, 1).ids,
        "vim manual": random_windows(joined(VIM_MANUAL), args.windows, 128, 1).ids,
    }
    evaluation = wiki_and_pydoc_windows(tokenizer, 128, args.eval_windows)

    @torch.no_grad()
    def log_probs(ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.log_softmax(model(b).logits.float(), -1).half() for b in ids.split(8)])

    dense = {name: log_probs(ids) for name, ids in texts.items()}

    @torch.no_grad()
    def kl(name: str) -> float:
        total = 0.0
        for i, batch in enumerate(texts[name].split(8)):
            logq = torch.log_softmax(model(batch).logits.float(), -1)
            logp = dense[name][i * 8 : (i + 1) * 8].float()
            total += float((logp.exp() * (logp - logq)).sum())
        return total / texts[name].numel()

    to_remove = int(args.share * sum(p.numel() for p in model.parameters()))
    cost, ladder, budget = search_space(model, to_remove)  # the search's own
    database = LevelDatabase(list(model.model.layers))
    database.measure(model.model.embed_tokens(cut.ids), runner_for(model, 128, 8))
    allocations = {
        "uniform": ladder.uniform(budget),
        "global ranking (the default's)": global_start(database, ladder, cost, budget, to_remove),
    }
    recorded = [row for path in args.allocations for row in json.loads(path.read_text()).get("rows", [])]
    for row in recorded:
        if row.get("levels") and abs(row.get("share", args.share) - args.share) < 1e-9:
            # a search_assembly row is named by its selection text; a row of this file keeps its own name
            where = ", ".join(Path(part).name for part in (row.get("search_dataset") or CALIBRATION_TEXT).split(","))
            label = row.get("allocation") or f"searched on {where}"
            allocations.setdefault(label, [Level.from_dict(d) for d in row["levels"]])
    rows = []
    for label, allocation in allocations.items():
        for index, level in enumerate(allocation):
            database.install(index, level)
        row = {"allocation": label, "kl": {name: round(kl(name), 4) for name in texts}}
        row["ppl"] = {name: round(perplexity(model, w, 8).ppl, 2) for name, w in evaluation.items()}
        row["levels"] = [lv.to_dict() for lv in allocation]
        print(json.dumps({k: v for k, v in row.items() if k != "levels"}), flush=True)
        rows.append(row)
        write_results(
            "selection_text",
            title="Which text the search can select on: KL to the dense model per text, and PPL (SmolLM2-135M, 20 %)",
            notes=(
                f"{args.share:.0%} of all parameters removed; every allocation in one level database (cut on 64"
                " wikitext-2 validation windows, each layer refitted on dense inputs, what the search measures)."
                f" KL: mean per token to the dense model on {args.windows} windows × 128 tokens of each text. PPL:"
                f" the first {args.eval_windows} windows of wikitext-2 test and of pydoc. A text is fit to select on"
                " when it ranks the allocations as the PPL columns do."
            ),
            tables=[
                table(
                    "allocation, KL to dense per selection text, PPL",
                    ["allocation", *(f"KL {n}" for n in texts), "wiki PPL", "pydoc PPL"],
                    [[r["allocation"], *r["kl"].values(), r["ppl"]["wiki"], r["ppl"]["pydoc"]] for r in rows],
                )
            ],
            rows=rows,
        )


if __name__ == "__main__":
    main()
