"""Benchmark of the main job: accuracy on TEST and the new site, wall time per stage, peak memory.

    uv run python benchmarks/training.py [--profile quick]

Runs the real training flow on the embedded defaults (it registers a model in the local store like
the main job does) and appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from hematovision.settings import quiet_environment

quiet_environment()

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = Path("/proc/meminfo").read_text().split()[1] if Path("/proc/meminfo").exists() else "0"
    import os

    return f"{os.cpu_count()} cores ({cpu}), {int(memory_gb) / 1024**2:.0f} GiB RAM, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def code_version() -> str:
    """The commit the code that runs comes from, marked when tracked files differ from it (read at
    the start: commits may land while a benchmark runs)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip():
        commit += " (with uncommitted changes)"
    return commit


def record(lines: list[str]) -> None:
    """Append one dated section to RESULTS.md (newest last)."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nWritten by the commands in `benchmarks/`; newest last.\n")
    with RESULTS.open("a") as out:
        out.write("\n".join(lines) + "\n")


def fmt_ci(m: dict, key: str) -> str:
    if f"{key}_ci95" not in m:
        return ""
    low, high = m[f"{key}_ci95"]
    return f" [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()

    from flows.training import training_flow
    from hematovision import CLASSES
    from hematovision.params import load_params
    from hematovision.settings import get_settings

    # The code that ran is the code at the start (commits may land while it runs).
    commit = code_version()
    p = load_params(Path("params.yaml"), args.profile)
    recipe = (
        f"seed {p.seed}, crop {p.model.image_size} px, head {p.train.head_epochs} epochs, fine-tune top {p.train.finetune_blocks} "
        f"blocks x {p.train.finetune_epochs} epochs (learning rate {p.train.finetune_learning_rate:g}, cosine decay), colour jitter {p.train.colour_jitter}, crop jitter {p.train.crop_jitter}, "
        f"{p.model.tta_views} test-time views; cells grouped by {p.prepare.cell_grouping}"
        + (f" (cosine distance {p.prepare.cell_max_distance:g})" if p.prepare.cell_grouping == "content" else "")
    )
    cache = get_settings().path(get_settings().paths.cache_dir)
    cache_state = "warm" if cache.exists() and any(cache.iterdir()) else "cold"

    started = time.perf_counter()
    summary = training_flow(profile=args.profile)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    prepared = json.loads((get_settings().path(get_settings().paths.prepared_dir) / "summary.json").read_text())
    cells = "; ".join(
        f"{split} " + "/".join(str(prepared["groups"][split].get(c, 0)) for c in CLASSES)
        for split in ("train", "val", "test")
        if split in prepared["groups"]
    )

    lines = [
        f"\n## Training main job — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}; profile: {args.profile or 'default'}; data version {summary['data_hash']}; model v{summary['version']}",
        f"- recipe: {recipe}; embedding cache {cache_state} at start",
        f"- wall time of the whole flow: {wall / 60:.1f} min; peak memory (RSS): {peak_mb:.0f} MiB",
        "- per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items()),
        f"- cells (groups) per class, {'/'.join(c[:2].upper() for c in CLASSES)}: {cells}",
        "",
        "| data | images | accuracy [95% CI, cells resampled] | macro-F1 | cells | cell-level accuracy [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "val": "validation (held-out TRAIN cells)",
        "test": "official TEST",
        "new_site": "pbc-sample (another lab, 4 classes)",
    }
    for split, label in names.items():
        m = summary["metrics"].get(split)
        if not m:
            continue
        lines.append(
            f"| {label} | {m['n_images']} | {m['accuracy']:.3f}{fmt_ci(m, 'accuracy')} | {m['macro_f1']:.3f} | "
            f"{m.get('n_cells', '')} | {m.get('cell_accuracy', float('nan')):.3f}{fmt_ci(m, 'cell_accuracy')} |"
        )
    if p.prepare.cell_grouping == "content":
        lines.append(
            "\nCells are found by clustering the frozen backbone's crop embeddings (src/hematovision/data/cells.py; "
            "pbc-sample: one image each); clusters can merge real cells or split one, so cell counts are approximate."
        )
    else:
        lines.append(
            "\nCells are the dataset's `_<k>_` index (pbc-sample: one image each). It is not one real cell "
            "(benchmarks/error_analysis.py): cell-level accuracy and intervals that resample cells are optimistic."
        )
    for split in ("test", "new_site"):
        m = summary["metrics"].get(split)
        if m:
            per_class = ", ".join(f"{c} {s['f1']:.2f}" for c, s in m["per_class"].items())
            lines.append(
                f"\n{names[split]} per-class F1: {per_class}; confusion (rows true, cols predicted): {m['confusion_matrix']}"
            )
    val = summary["metrics"].get("val", {})
    if "temperature" in val:
        lines.append(
            f"\nOpen set and calibration (fitted on validation): temperature {val['temperature']:.2f}, "
            f"expected calibration error {val['ece_uncalibrated']:.3f} before, {val['ece']:.3f} after; threshold at the "
            f"validation quantile {p.open_set.known_quantile}. Answered `unknown`: "
            + "; ".join(
                f"{names[split]} {m['unknown_rate']:.3f}"
                + (
                    " (by folder: " + ", ".join(f"{k} {v:.2f}" for k, v in m["unknown_rate_by_label"].items()) + ")"
                    if split == "new_site"
                    else ""
                )
                for split in ("val", "test", "new_site")
                if (m := summary["metrics"].get(split)) and m.get("unknown_rate") is not None
            )
            + (
                f"; open-set AUROC on pbc-sample (its four classes vs basophils) {summary['metrics']['new_site']['open_set_auroc']:.3f}"
                if "open_set_auroc" in summary["metrics"].get("new_site", {})
                else ""
            )
        )
    lines.append(
        f"\nGate: {'passed' if summary['gate']['passed'] else 'refused'} — " + "; ".join(summary["gate"]["reasons"])
    )
    record(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
