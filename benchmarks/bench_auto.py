"""``--strategy auto`` against the hand-written frozen linear baseline, on every real data set at hand.

    python benchmarks/bench_auto.py [--quick] [--budget 15m] [--small-budget 3m] [--json]

For each data set (clothing-small from ../shared/data when present, scikit-learn's digits, scikit-image's
LFW faces vs non-faces, at the input sizes ``bench_linear_heads.py`` uses) it runs, in one process:

* ``auto_finetune`` on efficientnet_lite0 within the time budget (clothing-small: ``--budget``, the
  others: ``--small-budget``), no other setting, and scores the test split once on its choice;
* the hand-written baseline: the same frozen pooled features, StandardScaler + scikit-learn
  ``LogisticRegression`` with 5-fold CV over C on train+validation (``bench_linear_heads.baseline``).

Targets: auto >= the baseline on every data set; clothing-small with a 15-minute budget >= 0.93.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MODULE, Report, Target, machine, parser, prepared_home, run_script  # noqa: E402
from bench_linear_heads import baseline, datasets, features  # noqa: E402

from hubkit import Module  # noqa: E402
from hubkit.finetune import RunConfig, auto_finetune, parse_duration  # noqa: E402
from hubkit.hub.cache import Cache  # noqa: E402


def main(argv: list[str]) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="15m", help="auto's time budget on clothing-small")
    p.add_argument("--small-budget", default="3m", help="auto's time budget on the small data sets")
    p.add_argument("--features-dir", default="/tmp/hubkit-bench-linear-heads", help="where extracted features are kept")
    args = p.parse_args(argv)

    cache = Cache(prepared_home(args.home))
    module = Module(name=MODULE, cache=cache, precision="fp32")
    report = Report("auto", "--strategy auto vs the hand-written frozen logistic regression: test accuracy",
                    ["data", "train", "auto budget s", "auto test acc", "auto choice", "auto s", "baseline test acc",
                     "baseline", "auto - baseline (points)"], machine=machine("cpu"))
    fit_baseline = baseline("logistic")
    for name, (dataset, size) in datasets(args.quick).items():
        splits = features(name, dataset, size, module, Path(args.features_dir))
        x = np.concatenate([splits["train"][0], splits["validate"][0]])
        y = np.concatenate([splits["train"][1], splits["validate"][1]])
        predict, chosen = fit_baseline(x, y, len(dataset.label_list))
        base_acc = float(np.mean(predict(splits["test"][0]) == splits["test"][1]))

        budget = parse_duration(args.budget if name == "clothing-small" else args.small_budget)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hubkit-bench-auto-") as folder:
            config = RunConfig(checkpoint_dir=folder, input_size=size, progress=False)
            result = auto_finetune(Module(name=MODULE, cache=cache), dataset, time_budget=budget, config=config)
        seconds = time.perf_counter() - started
        acc = float(result.test_metrics["acc"])
        report.rows.append([name, len(dataset.samples("train")), budget, acc, f"{result.best} ({result.final_note})",
                            seconds, base_acc, chosen, 100 * (acc - base_acc)])
        print(f"{name}: auto {acc:.4f} ({result.best}, {seconds:.0f} s), baseline {base_acc:.4f} ({chosen})",
              file=sys.stderr, flush=True)
        report.targets.append(Target(f"{name}: auto test acc minus the hand-written baseline (points)",
                                     100 * (acc - base_acc), ">=", 0.0, ""))
        if name == "clothing-small" and budget >= 900:
            report.targets.append(Target("clothing-small: auto test acc with a 15-minute budget", acc, ">=", 0.93, ""))
    return report


if __name__ == "__main__":
    run_script(main)
