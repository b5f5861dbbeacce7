"""Linear heads on frozen features: hubkit's SVM and logistic heads against the hand-written
scikit-learn baselines, on the same efficientnet_lite0 pooled features, side by side.

    python benchmarks/bench_linear_heads.py [--quick] [--json] [--features-dir DIR]

The backbone runs once per data set (features kept in ``--features-dir`` between runs). Each
linear model is then fitted on train+validation and scored once on test:

* hubkit ``SVMHead`` and ``LogisticHead`` (regularisation chosen by their own k-fold CV);
* the hand-written way: ``StandardScaler`` + scikit-learn ``LogisticRegression`` / ``LinearSVC``
  in a ``GridSearchCV`` over C (5-fold, stratified) on train+validation.

Data: clothing-small from ../shared/data (skipped when absent), scikit-learn's digits
(upsampled from 8x8) and scikit-image's LFW faces vs non-faces. Targets on clothing-small:
both hubkit heads fit in <= 30 s and score within 0.5 points of the better baseline.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import skimage
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch.utils.data import DataLoader

from hubkit import Module
from hubkit.data.datasets import ArrayDataset, ImageFolder, ImageSamples
from hubkit.data.transforms import build_transform
from hubkit.finetune import make_head  # as a fine-tuning run imports it (torch.optim's imports come with it)
from hubkit.hub.cache import Cache
from hubkit.hub.manifest import Preprocessing

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CLOTHING, MODULE, Report, Target, machine, parser, prepared_home, run_script  # noqa: E402

#: The C grid of the hand-written baselines: what a careful user searches on standardised features.
BASELINE_CS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1e-1, 1.0)


# --- the data sets and their features ---------------------------------------------------------------
def datasets(quick: bool) -> dict:
    """name -> (dataset, input size): the real image sets reachable on this machine."""
    out = {}
    if CLOTHING.is_dir() and not quick:
        out["clothing-small"] = (ImageFolder(CLOTHING), 224)
    digits = load_digits()
    count = 400 if quick else len(digits.target)
    out["digits" if count == len(digits.target) else f"digits-{count}"] = (ArrayDataset(digits.images[:count], digits.target[:count], [str(i) for i in range(10)],
                                  value_range=(0, 16), seed=0), 64)
    faces = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    out["lfw-faces"] = (ArrayDataset((faces * 255).astype(np.uint8), [0] * 100 + [1] * 100, ["face", "non_face"],
                                     seed=0), 64)
    return out


def extract(module, dataset, input_size: int, split: str):
    """The frozen backbone's pooled features of one split (fp32, eval mode), and the labels."""

    pre = module.manifest.preprocessing
    pre = Preprocessing((3, input_size, input_size), pre.interpolation, pre.crop_pct, pre.mean, pre.std)
    backbone = module.context(trainable=False).backbone.eval()
    loader = DataLoader(ImageSamples(dataset.samples(split), build_transform(pre)), batch_size=64)
    xs, ys = [], []
    with torch.inference_mode():
        for x, y in loader:
            xs.append(backbone(x).float().numpy())
            ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def features(name: str, dataset, input_size: int, module, folder: Path) -> dict:
    """{split: (X, y)} for train, validate and test, read from ``folder`` or computed once and kept there."""

    path = folder / f"{name}-{MODULE}-{input_size}.npz"
    if path.is_file():
        data = np.load(path)
        return {s: (data[f"{s}_x"], data[f"{s}_y"]) for s in ("train", "validate", "test")}
    out = {s: extract(module, dataset, input_size, s) for s in ("train", "validate", "test")}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{s}_{k}": v for s, (x, y) in out.items() for k, v in (("x", x), ("y", y))})
    return out


# --- the linear models -------------------------------------------------------------------------------
def hubkit_head(kind: str):

    def fit(x, y, num_classes):
        head = make_head(kind)
        weight, bias = head.fit(x, y, num_classes)
        return (lambda xt: (xt @ weight.T + bias).argmax(1)), f"C={head.best_C:g}, CV {head.cv_score:.3f}"
    return fit


def baseline(kind: str):
    """The hand-written way: StandardScaler + an sklearn linear model, 5-fold CV over C on train+validation."""
    def fit(x, y, num_classes):

        model = LogisticRegression(max_iter=2000) if kind == "logistic" else LinearSVC(dual="auto", max_iter=5000)
        search = GridSearchCV(make_pipeline(StandardScaler(), model), {f"{type(model).__name__.lower()}__C": list(BASELINE_CS)},
                              cv=StratifiedKFold(5, shuffle=True, random_state=0), n_jobs=1)
        search.fit(x, y)
        (c,) = search.best_params_.values()
        return search.predict, f"C={c:g}, CV {search.best_score_:.3f}"
    return fit


def main(argv: list[str]) -> Report:

    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--features-dir", default="/tmp/hubkit-bench-linear-heads", help="where extracted features are kept")
    p.add_argument("--skip-svm-baseline", action="store_true", help="skip the hand-written LinearSVC (slow on 1280-d)")
    p.add_argument("--extract-only", action="store_true", help="compute (or read) the features and stop")
    args = p.parse_args(argv)

    module = Module(name=MODULE, cache=Cache(prepared_home(args.home)), precision="fp32")
    report = Report("linear_heads", "linear heads on frozen efficientnet_lite0 features: test accuracy, fit seconds",
                    ["data", "train+val", "dim", "model", "test acc", "fit s", "cpu s", "chosen"], machine=machine("cpu"))
    models = {"hubkit svm": hubkit_head("svm"), "hubkit logistic": hubkit_head("logistic"),
              "sklearn logistic (hand-written)": baseline("logistic")}
    if not args.skip_svm_baseline:
        models["sklearn LinearSVC (hand-written)"] = baseline("svm")
    if not CLOTHING.is_dir():
        report.notes.append(f"{CLOTHING} is not on this machine: clothing-small skipped")
    for name, (dataset, size) in datasets(args.quick).items():
        splits = features(name, dataset, size, module, Path(args.features_dir))
        if args.extract_only:
            continue
        x = np.concatenate([splits["train"][0], splits["validate"][0]])
        y = np.concatenate([splits["train"][1], splits["validate"][1]])
        xt, yt = splits["test"]
        scores = {}
        for model_name, fit in models.items():
            start, cpu = time.perf_counter(), time.process_time()
            predict, chosen = fit(x, y, len(dataset.label_list))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            scores[model_name] = (float(np.mean(predict(xt) == yt)), seconds)
            report.rows.append([name, len(y), x.shape[1], model_name, scores[model_name][0], seconds, cpu, chosen])
            print(f"{name}: {model_name}: test acc {scores[model_name][0]:.4f}, fit {seconds:.1f} s ({cpu:.1f} s CPU), "
                  f"{chosen}", file=sys.stderr, flush=True)  # as it goes: the hand-written SVM can take very long
        if name == "clothing-small":
            best_baseline = max(v[0] for k, v in scores.items() if "hand-written" in k)
            for kind in ("svm", "logistic"):
                acc, seconds = scores[f"hubkit {kind}"]
                report.targets.append(Target(f"clothing-small {kind} head fit", seconds, "<=", 30.0, " s"))
                report.targets.append(Target(f"clothing-small {kind} head test acc minus best baseline (points)",
                                             100 * (acc - best_baseline), ">=", -0.5, ""))
    return report


if __name__ == "__main__":
    run_script(main)
