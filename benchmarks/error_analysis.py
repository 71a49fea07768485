"""Where the champion's TEST errors are: do the groups name cells, which cells are misread, and is
the cell in view?

    uv run python benchmarks/error_analysis.py [--model models:/hematovision@champion]

The datasets README says every file `_<k>_<n>.jpeg` of one split and class is a rotation/shift/flip
of one real cell. prepare no longer trusts that (src/hematovision/data/cells.py): it groups pictures by
content. Both groupings are put to two tests that would come out very differently for real cells:

1. Errors per group. A classifier's mistakes follow real cells (one hard cell is misread in most of
   its copies), so if groups were cells, group accuracies would sit near 0 or 1. If each group mixes
   many cells, every group of a class shows about the class's error rate.
2. Nearest neighbours. Copies of one cell look alike after rotation: with test-time-view-averaged
   embeddings, an image's most similar other image should usually share its group. The chance
   level (a random image of the same class) is printed beside it.

3. Errors by cell. TEST's pictures clustered with the champion's own embeddings, which separate
   copies of one cell sharply: how many cells each class has and how many of TEST's errors come
   from cells the model misreads in most of their copies (each such cell moves TEST accuracy by
   its share of the images).

4. Cell in view. Some TEST pictures show the labelled cell cut by the frame or by a black rotation
   wedge, or no stained nucleus at all (the localiser then falls back to the centre). Accuracy is
   broken down by what the localiser saw: a whole nucleus, one at the edge, none.

5. What the misread pictures resemble. For each TEST image the model gets wrong, the labels of its
   10 nearest TRAIN images (plain view, the same embeddings): if they carry the label the model
   gave, the model did what TRAIN taught it, and the picture looks like cells TRAIN files under
   that other class.

Appends a dated section to benchmarks/RESULTS.md. Uses the embedding cache the evaluate stage fills.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from hematovision.settings import quiet_environment

quiet_environment()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import machine, record  # noqa: E402 - a sibling script, importable once benchmarks/ is on sys.path

_ERROR_CELL_DISTANCE = 0.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models:/hematovision@champion")
    args = parser.parse_args()

    from hematovision import stores
    from hematovision.data.cells import cluster_cells
    from hematovision.data.dataset import label_indices
    from hematovision.data.imaging import load_rgb
    from hematovision.data.localize import locate_wbc
    from hematovision.model.embeddings import cached_embeddings
    from hematovision.params import load_params
    from hematovision.registry.packaging import load_classifier
    from hematovision.registry.tracking import configure_mlflow
    from hematovision.settings import get_settings
    from hematovision.training.steps import load_manifest, official_test_rows

    settings = get_settings()
    configure_mlflow(settings)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip():
        commit += " (with uncommitted changes)"
    classifier = load_classifier(args.model)
    rows = official_test_rows(load_manifest(settings), load_params(Path("params.yaml"))).reset_index(drop=True)
    paths = [settings.path(settings.paths.data_dir) / p for p in rows.path]
    views = classifier.config.tta_views
    cache = stores.embedding_cache(settings)
    embeddings = cached_embeddings(classifier, paths, cache, views=views).reshape(views, len(paths), -1)
    probabilities = np.stack([classifier.classify_embeddings(e) for e in embeddings]).mean(axis=0)
    correct = probabilities.argmax(axis=1) == label_indices(rows.label, classifier.classes)

    # Rotation-tolerant similarity: the mean over the test-time views of unit-length embeddings.
    unit = embeddings / np.linalg.norm(embeddings, axis=2, keepdims=True)
    mean = unit.mean(axis=0)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)

    lines = [
        f"\n## TEST error analysis — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}; model {args.model} (v{_version(args.model)}); {views} test-time views; {len(rows)} images",
        "",
        "Do the groups name cells?",
        "",
        "| grouping | class | groups | images a group | class accuracy | group accuracy min-max | images in groups with accuracy <0.2 or >0.8 | nearest neighbour in the same group | chance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groupings = {"name_group": "`_<k>_` in the file name", "group": "cells found by content (prepare)"}
    for column, title in groupings.items():
        if column not in rows:
            continue
        for label in classifier.classes:
            index = np.flatnonzero(rows.label.to_numpy() == label)
            if len(index) < 2:
                continue
            groups = rows[column].to_numpy()[index]
            by_group = {g: correct[index][groups == g] for g in np.unique(groups)}
            accuracies = np.array([v.mean() for v in by_group.values()])
            sizes = np.array([len(v) for v in by_group.values()])
            decided = sizes[(accuracies < 0.2) | (accuracies > 0.8)].sum() / sizes.sum()
            similarity = mean[index] @ mean[index].T
            np.fill_diagonal(similarity, -np.inf)
            neighbour_same = (groups[similarity.argmax(axis=1)] == groups).mean()
            chance = (sizes * (sizes - 1)).sum() / (len(index) * (len(index) - 1))
            lines.append(
                f"| {title} | {label} | {len(sizes)} | {np.median(sizes):.0f} | {correct[index].mean():.3f} | "
                f"{accuracies.min():.2f}-{accuracies.max():.2f} | {decided:.2f} | {neighbour_same:.2f} | {chance:.2f} |"
            )
    lines.append(
        "\nIf groups were cells, group accuracies would spread from ~0 to ~1 (a model misreads a hard "
        "cell in most of its copies) and nearly every nearest neighbour would share its group."
    )

    # The champion's own view-averaged embeddings separate copies of one cell far more tightly than
    # the frozen backbone prepare uses (it has learned these cells): the sharpest look at which
    # cells TEST's errors come from.
    lines += [
        "",
        f"Errors by cell (clusters of the champion's view-averaged embeddings, cosine distance {_ERROR_CELL_DISTANCE})",
        "",
        "| class | cells | images a cell (median) | cells misread in most copies | images in those cells | their misread images | other misread images |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = []
    for label in classifier.classes:
        index = np.flatnonzero(rows.label.to_numpy() == label)
        ids = cluster_cells(mean[index], _ERROR_CELL_DISTANCE)
        sizes, wrong = np.bincount(ids), np.bincount(ids, weights=~correct[index]).astype(int)
        mostly = wrong > sizes / 2
        lines.append(
            f"| {label} | {len(sizes)} | {np.median(sizes):.0f} | {mostly.sum()} | {sizes[mostly].sum()} | "
            f"{wrong[mostly].sum()} | {wrong[~mostly].sum()} |"
        )
        worst += [(int(wrong[i]), int(sizes[i]), label) for i in np.flatnonzero(mostly)]
    if worst:
        lines.append(
            "\nMost misread cells (misread copies / copies): "
            + ", ".join(
                f"{label} {w}/{n} (= {w / len(rows):.3f} of TEST accuracy)"
                for w, n, label in sorted(worst, reverse=True)[:5]
            )
        )

    boxes = [locate_wbc(load_rgb(path)) for path in paths]
    seen = np.array(["none" if not b.found else "at the edge" if b.at_edge else "whole" for b in boxes])
    lines += [
        "",
        "Is the cell in view? (what the localiser found)",
        "",
        "| class | whole nucleus in view: images, accuracy | nucleus at the frame/wedge edge | no nucleus found |",
        "|---|---|---|---|",
    ]
    for label in [*classifier.classes, "all"]:
        in_class = rows.label.to_numpy() == label if label != "all" else np.ones(len(rows), bool)
        cells = []
        for kind in ("whole", "at the edge", "none"):
            chosen = in_class & (seen == kind)
            cells.append(f"{chosen.sum()}, {correct[chosen].mean():.3f}" if chosen.any() else "0")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    train_rows = load_manifest(settings)
    train_rows = train_rows[train_rows.split != "test"].reset_index(drop=True)
    train = cached_embeddings(classifier, [settings.path(settings.paths.data_dir) / p for p in train_rows.path], cache)
    cache.close()
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    predicted = np.asarray(classifier.classes)[probabilities.argmax(axis=1)]
    lines += [
        "",
        "What the misread pictures resemble (labels of the 10 nearest TRAIN images)",
        "",
        "| true class -> predicted | images | neighbours labelled as predicted | as the true class | as another |",
        "|---|---|---|---|---|",
    ]
    truth = rows.label.to_numpy()
    for (true, guess), count in sorted(
        pd.Series(list(zip(truth[~correct], predicted[~correct]))).value_counts().items()
    ):
        chosen = np.flatnonzero((truth == true) & (predicted == guess))
        nearest = np.argsort(-(mean[chosen] @ train.T), axis=1)[:, :10]
        labels = train_rows.label.to_numpy()[nearest]
        lines.append(
            f"| {true} -> {guess} | {count} | {(labels == guess).mean():.2f} | {(labels == true).mean():.2f} | "
            f"{((labels != guess) & (labels != true)).mean():.2f} |"
        )
    record(lines)
    print("\n".join(lines))


def _version(model_uri: str) -> str:
    """The registry version behind a models:/name@alias or models:/name/N URI."""
    from mlflow import MlflowClient

    name, _, rest = model_uri.removeprefix("models:/").partition("@")
    if rest:
        return MlflowClient().get_model_version_by_alias(name, rest).version
    return model_uri.rsplit("/", 1)[-1]


if __name__ == "__main__":
    main()
