"""Benchmark of answers of "unknown" and of adding a class: the champion before any correction, after
the new site's four-class corrections, and after those plus 100 corrections of one new type.

    uv run python benchmarks/open_set.py [--profile quick] [--site-corrections 400] [--type-corrections 100]

Needs a champion in the project's registry (`uv run hematovision run` trains one). The second
laboratory's images are split once, seeded: per four-class folder `--eval-per-class` images that are
never corrected, per other type (pbc-sample/basophil, pbc-other/*) `--eval-per-type`; corrections
are drawn from the rest. Each retraining starts from the same champion, with its own corrections
store, DVC folder and retraining output in a temporary folder (a promoted challenger is rolled
back). Scored on each model: the share answered `unknown` on the official TEST, on the site's
four classes and on each other type, the open-set AUROC between them, the expected calibration
error, and for an added type its recall. Appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from hematovision.settings import quiet_environment

quiet_environment()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import code_version, machine, record  # noqa: E402 - a sibling script, importable once benchmarks/ is on sys.path

OTHER_TYPES = {
    "basophil": "basophil",
    "immature granulocyte": "ig",
    "erythroblast": "erythroblast",
    "platelet": "platelet",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--site-corrections", type=int, default=400)
    parser.add_argument("--type-corrections", type=int, default=100)
    parser.add_argument("--types", nargs="+", default=list(OTHER_TYPES), help="Types to add, one retraining each.")
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--eval-per-type", type=int, default=150)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    import pandas as pd

    from flows.retraining import retraining_flow
    from hematovision import CLASSES, stores
    from hematovision.model.classifier import Classifier
    from hematovision.params import load_params
    from hematovision.registry.packaging import load_classifier
    from hematovision.registry.registry import CHAMPION
    from hematovision.registry.tracking import configure_mlflow
    from hematovision.settings import get_settings
    from hematovision.training.evaluate import evaluate_rows
    from hematovision.training.retrain import CHALLENGER_DIR
    from hematovision.training.steps import load_manifest, official_test_rows

    commit = code_version()
    base = get_settings()
    params = load_params(Path("params.yaml"), args.profile)
    configure_mlflow(base)
    registry = stores.registry(base)
    champion = registry.version_by_alias(CHAMPION)
    if champion is None:
        sys.exit("no champion: run `uv run hematovision run` first")
    parent = str(champion.version)

    # The second laboratory, split once: evaluation images never corrected, pools to correct from.
    site = base.path(base.paths.new_site_source)
    rng = random.Random(args.seed)
    evaluation, pools = [], {}
    folders = {c: site / c for c in CLASSES} | {
        t: (site / f if (site / f).is_dir() else site.parent / "pbc-other" / f) for t, f in OTHER_TYPES.items()
    }
    for kind, folder in folders.items():
        paths = sorted(folder.glob("*.jpg"))
        rng.shuffle(paths)
        keep = args.eval_per_class if kind in CLASSES else args.eval_per_type
        evaluation += [(p, kind) for p in paths[:keep]]
        pools[kind] = paths[keep:]
    site_pool = [
        (pools[c][i], c) for i in range(max(len(pools[c]) for c in CLASSES)) for c in CLASSES if i < len(pools[c])
    ]
    eval_rows = pd.DataFrame(
        {
            "path": [str(p) for p, _ in evaluation],
            "label": [k for _, k in evaluation],
            "group": [f"eval/{p.name}" for p, _ in evaluation],
        }
    )
    test_rows = official_test_rows(load_manifest(base), params)
    test_rows = test_rows.assign(path=[str(base.path(base.paths.data_dir) / p) for p in test_rows.path])

    def score(classifier) -> dict:
        with stores.embedding_cache(base) as cache:
            samples = params.evaluate.bootstrap_samples
            site_scores = evaluate_rows(classifier, eval_rows, Path("/"), cache, samples, params.seed)
            test_scores = evaluate_rows(classifier, test_rows, Path("/"), cache, samples, params.seed)
        return {"site": site_scores, "test": test_scores}

    results = [
        {
            "name": "champion, before any correction",
            "scores": score(load_classifier(f"models:/{base.registry.registered_model}/{parent}")),
        }
    ]
    print(f"scored the champion v{parent}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="hv-open-set-bench-"))
    scenarios = [("site", [])] + [(t, [t]) for t in args.types]
    for name, added in scenarios:
        run_dir = work / name.replace(" ", "-")
        run_dir.mkdir()
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=run_dir, check=True)
        os.environ.update(
            {
                "HEMATOVISION_LAB_DB": str(run_dir / "lab.sqlite"),
                "HEMATOVISION_CORRECTIONS_IMAGES_DIR": str(run_dir / "corrections-images"),
                "HEMATOVISION_CORRECTIONS_DATASET_DIR": str(run_dir / "corrections"),
                "HEMATOVISION_RETRAIN_DIR": str(run_dir / "retrain"),
            }
        )
        get_settings.cache_clear()
        settings = get_settings()
        store = stores.corrections(settings)
        corrections = site_pool[: args.site_corrections] + [
            (p, t) for t in added for p in pools[t][: args.type_corrections]
        ]
        for path, kind in corrections:
            store.submit("benchmark", kind, path.read_bytes(), comment="PBC pathologists' label")
        started = time.perf_counter()
        summary = retraining_flow(profile=args.profile)
        wall = time.perf_counter() - started
        challenger = Classifier.load(settings.path(settings.paths.retrain_dir) / CHALLENGER_DIR)
        if summary["promoted"]:
            registry.rollback()  # every retraining starts from the same champion
        label = f"after {args.site_corrections} site corrections" + (
            f" + {args.type_corrections} {added[0]}" if added else ""
        )
        results.append(
            {
                "name": label,
                "added": added,
                "classes": list(challenger.classes),
                "summary": summary,
                "wall": wall,
                "scores": score(challenger),
            }
        )
        print(f"{label}: {'promoted' if summary['promoted'] else 'refused'} in {wall:.0f} s", flush=True)

    def rate(scores: dict, kinds) -> float:
        by = scores["site"]["unknown_rate_by_label"]
        counts = eval_rows.label.value_counts()
        total = sum(counts[k] for k in kinds if k in by)
        return sum(by[k] * counts[k] for k in kinds if k in by) / total if total else float("nan")

    lines = [
        f"\n## Unknown cells and added classes — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}; profile: {args.profile or 'default'}; champion (parent) v{parent}; open set: "
        f"Mahalanobis distance of the mean test-time-view embedding to the nearest class (shared shrunk covariance), "
        f"threshold at the validation quantile {params.open_set.known_quantile}; retrain mode {params.retrain.mode}",
        f"- second laboratory, never corrected: {args.eval_per_class} images of each of its four classes, "
        f"{args.eval_per_type} of each other type; corrections drawn from the rest (site: balanced by class)",
        "",
        "| model | TEST unknown | site's 4 classes unknown | basophil | immature granulocyte | erythroblast | platelet | "
        "open-set AUROC (site) | ECE TEST / site | site accuracy (4 classes) | TEST accuracy [95% CI, cells resampled] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["scores"]
        by = s["site"]["unknown_rate_by_label"]
        lines.append(
            f"| {r['name']} | {s['test']['unknown_rate']:.3f} | {rate(s, CLASSES):.3f} | "
            + " | ".join(f"{by[t]:.3f}" + (" (a class)" if t in r.get("classes", CLASSES) else "") for t in OTHER_TYPES)
            + f" | {s['site'].get('open_set_auroc', float('nan')):.3f} | {s['test']['ece']:.3f} / {s['site']['ece']:.3f} | "
            f"{s['site']['accuracy']:.3f} | {s['test']['accuracy']:.3f} "
            f"[{s['test'].get('accuracy_ci95', [float('nan')] * 2)[0]:.3f}, {s['test'].get('accuracy_ci95', [float('nan')] * 2)[1]:.3f}] |"
        )
    site_model = results[1]
    lines.append("")
    for r in results[2:]:
        t = r["added"][0]
        per_class = r["scores"]["site"]["per_class"]
        if t in per_class:
            shared = ", ".join(
                f"{c} {site_model['scores']['site']['per_class'][c]['f1']:.2f} -> {per_class[c]['f1']:.2f}"
                for c in CLASSES
            )
            lines.append(
                f"- + {args.type_corrections} {t}: a class ({', '.join(r['classes'])}); recall on {args.eval_per_type} "
                f"{t} never corrected {per_class[t]['recall']:.3f} (precision {per_class[t]['precision']:.3f}); "
                f"site F1 of the four (site-only retrain -> this one): {shared}; gate "
                f"{'promoted' if r['summary']['promoted'] else 'refused'}: {'; '.join(r['summary']['gate']['reasons'])}; "
                f"{r['wall'] / 60:.1f} min"
            )
        else:
            lines.append(f"- + {args.type_corrections} {t}: did not become a class ({', '.join(r['classes'])})")
    record(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
