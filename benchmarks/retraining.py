"""Benchmark of the correction loop: new-site accuracy before and after 100, 200 and 400 corrections,
TEST accuracy kept, and the wall time of the retraining flow.

    uv run python benchmarks/retraining.py [--profile quick] [--counts 100 200 400]

Needs a champion in the project's registry (`uv run hematovision run` trains one). pbc-sample (4
classes) is split once, seeded: an evaluation holdout of `--eval-per-class` images a class that is
never corrected, and a pool the simulated pathologist corrects from (nested sets: the 200 include
the 100). Each count starts from the same champion, with its own corrections store, DVC folder and
retraining output in a temporary folder; a promoted challenger is rolled back afterwards. Appends a
dated section to benchmarks/RESULTS.md.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--eval-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="Start from an empty embedding cache (the first count embeds raw data, TEST and corrections).",
    )
    parser.add_argument("--label", default="", help="Said in the section title (e.g. 'quick-profile model').")
    args = parser.parse_args()

    from hematovision import CLASSES, stores
    from hematovision.data.dataset import scan_class_folders
    from hematovision.model.classifier import Classifier
    from hematovision.params import load_params
    from hematovision.registry.registry import CHAMPION
    from hematovision.registry.tracking import configure_mlflow
    from hematovision.settings import get_settings
    from hematovision.training.evaluate import evaluate_rows
    from hematovision.training.retrain import CHALLENGER_DIR, PARENT_DIR

    commit = code_version()
    base = get_settings()
    params = load_params(Path("params.yaml"), args.profile)
    configure_mlflow(base)
    registry = stores.registry(base)
    champion = registry.version_by_alias(CHAMPION)
    if champion is None:
        sys.exit("no champion: run `uv run hematovision run` first")
    parent = str(champion.version)

    new_site = base.path(base.paths.new_site_source)
    rows, _ = scan_class_folders(new_site)
    rng = random.Random(args.seed)
    evaluation, pools = [], {}
    for cls in CLASSES:
        paths = sorted(new_site / p for p in rows[rows.label == cls].path)
        rng.shuffle(paths)
        evaluation += [(p, cls) for p in paths[: args.eval_per_class]]
        pools[cls] = paths[args.eval_per_class :]
    # Interleave classes so that every prefix of the pool is balanced.
    pool = [(pools[c][i], c) for i in range(max(map(len, pools.values()))) for c in CLASSES if i < len(pools[c])]
    import pandas as pd

    eval_rows = pd.DataFrame(
        {
            "path": [str(p) for p, _ in evaluation],
            "label": [c for _, c in evaluation],
            "group": [f"eval/{p.name}" for p, _ in evaluation],
        }
    )

    from flows.retraining import retraining_flow

    results = []
    work = Path(tempfile.mkdtemp(prefix="hv-retrain-bench-"))
    if args.cold_cache:
        os.environ["HEMATOVISION_CACHE_DIR"] = str(work / "embeddings-cache")
    for n in args.counts:
        run_dir = work / f"n{n}"
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
        for path, cls in pool[:n]:
            store.submit("benchmark", cls, path.read_bytes(), comment="pbc-sample label")
        started = time.perf_counter()
        summary = retraining_flow(profile=args.profile)
        wall = time.perf_counter() - started
        scores = {}
        with stores.embedding_cache(settings) as cache:
            for who, folder in (("champion", PARENT_DIR), ("challenger", CHALLENGER_DIR)):
                classifier = Classifier.load(settings.path(settings.paths.retrain_dir) / folder)
                scores[who] = evaluate_rows(
                    classifier, eval_rows, Path("/"), cache, params.evaluate.bootstrap_samples, params.seed
                )
        if summary["promoted"]:
            registry.rollback()  # every count starts from the same champion
        results.append({"n": n, "summary": summary, "wall": wall, "scores": scores})
        print(
            f"n={n}: new-site eval {scores['champion']['accuracy']:.3f} -> {scores['challenger']['accuracy']:.3f}; "
            f"TEST {summary['champion']['test_accuracy']:.3f} -> {summary['challenger']['test_accuracy']:.3f}; "
            f"{wall:.0f} s; {'promoted' if summary['promoted'] else 'refused'}",
            flush=True,
        )

    def ci(m: dict) -> str:
        low, high = m.get("accuracy_ci95", [float("nan")] * 2)
        return f"{m['accuracy']:.3f} [{low:.3f}, {high:.3f}]"

    p = params.retrain
    first = results[0]
    lines = [
        f"\n## Retraining on corrections — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC{' — ' + args.label if args.label else ''}",
        f"- machine: {machine()}",
        f"- commit: {commit}; profile: {args.profile or 'default'}; champion (parent) v{parent}; "
        f"retrain mode {p.mode}, {p.max_raw_images_per_cell} raw images per cell, {p.correction_views} views per correction, "
        f"{p.head_epochs} head epochs, corrections' share of the weight {p.corrections_share}, holdout {p.holdout_fraction} of corrections",
        f"- new-site evaluation: {len(evaluation)} pbc-sample images ({args.eval_per_class} a class) never corrected; "
        "corrections drawn from the rest, balanced by class, nested",
        f"- champion: new-site evaluation {ci(first['scores']['champion'])}, TEST {first['summary']['champion']['test_accuracy']:.3f}",
        "",
        "| corrections (trained on / held out) | new-site eval accuracy [95% CI] | macro-F1 | TEST accuracy (champion -> challenger) | corrections holdout (champion -> challenger) | gate | flow wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, c = r["summary"], r["scores"]["challenger"]
        lines.append(
            f"| {r['n']} ({s['corrections']['train']} / {s['corrections']['holdout']}) | {ci(c)} | {c['macro_f1']:.3f} | "
            f"{s['champion']['test_accuracy']:.3f} -> {s['challenger']['test_accuracy']:.3f} | "
            f"{s['champion'].get('holdout_accuracy', float('nan')):.3f} -> {s['challenger'].get('holdout_accuracy', float('nan')):.3f} | "
            f"{'promoted' if s['promoted'] else 'refused'} | {r['wall'] / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in s['timings_s'].items())}) |"
        )
    last = results[-1]
    per_class = ", ".join(f"{k} {v['f1']:.2f}" for k, v in last["scores"]["challenger"]["per_class"].items())
    lines.append(
        f"\nAfter {last['n']} corrections, new-site per-class F1: {per_class}; "
        f"gate: {'; '.join(last['summary']['gate']['reasons'])}"
    )
    if args.cold_cache:
        lines.append(
            "Embedding cache empty at start: the first count's wall time includes embedding the raw images, "
            "TEST and the corrections under the champion's backbone (the new-site evaluation is outside the flow)."
        )
    else:
        lines.append(
            "The first count's wall time includes embedding the raw images once under the champion's backbone "
            "(cached for every later retrain); TEST and pbc-sample embeddings under that backbone are already "
            "cached by the main job's evaluate stage when it ran on this machine."
        )
    record(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
