"""Machine-learning parameters: embedded defaults, overridden by ``params.yaml`` (which DVC tracks).

A *profile* (e.g. ``quick`` for tests and smoke runs) is a named set of overrides stored in the same
file under ``profiles:``, so a smoke run and the real run differ only by a word on the command line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class PrepareParams:
    val_fraction: float = 0.2  # share of TRAIN's images held out for validation, whole cells at a time
    # How copies of one cell are recognised: "content" clusters the frozen backbone's embeddings of
    # the cell crops (cells.py); "filename" trusts the `_<k>_` in the name, which this dataset's
    # copy gets wrong (validation then leaks).
    cell_grouping: str = "content"
    cell_max_distance: float = 0.25  # cosine distance at which clusters stop merging into one cell


@dataclass
class ModelParams:
    # ImageNet backbone (model/backbone.py): efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2
    backbone: str = "efficientnet-lite0"
    image_size: int = 192  # side of the square white-cell crop fed to the backbone
    dropout: float = 0.3
    tta_views: int = 4  # dihedral test-time views averaged at prediction (1 = off; 2, 4 or 8)
    # Stain normalisation of every crop before the backbone, at training and serving alike
    # (data/stain.py): "none", or a method that maps a laboratory's stain onto a fixed reference.
    stain: str = "none"


@dataclass
class TrainParams:
    batch_size: int = 32
    max_images_per_cell: int = 0  # 0 = every augmented copy of a cell; >0 caps them (quick runs)
    head_epochs: int = 30  # phase 1: new head on cached frozen embeddings (seconds per epoch)
    head_learning_rate: float = 1e-3
    finetune_blocks: int = 16  # phase 2: how many of the backbone's top blocks are unfrozen
    finetune_epochs: int = 10  # with the learning rate cosine-decayed to zero over them
    finetune_learning_rate: float = 1e-4
    finetune_images_per_epoch: int = 6000  # images drawn per fine-tuning epoch, balanced by class
    colour_jitter: float = 0.1  # strength of the stain/colour augmentation (hue/saturation/brightness)
    crop_jitter: float = 0.25  # random zoom-in/shift of the crop while fine-tuning: up to this share of its side
    stain_jitter: float = 0.0  # stain augmentation while fine-tuning: random scaling/shift of each stain's optical density (data/stain.py)


@dataclass
class OpenSetParams:
    """Answers of ``unknown`` (``model/open_set.py``), fitted with the model."""

    known_quantile: float = (
        0.95  # threshold at this quantile of validation cells' scores: ~5% of known cells go unknown
    )
    images_per_cell: int = 4  # training pictures per cell whose embeddings fit the class statistics


@dataclass
class ExportParams:
    """Cheaper answers (``model/export.py``): an int8 export registered as a flavour of the same version."""

    int8: bool = True  # build an int8 TensorFlow Lite export of every registered version
    # The export is served instead of the full model only when the paired interval of (its validation
    # accuracy - the full model's) lies above -max_accuracy_loss.
    max_accuracy_loss: float = 0.01


@dataclass
class EvaluateParams:
    bootstrap_samples: int = 1000
    max_images_per_class: int = 0  # 0 = all; >0 caps each class (quick runs)


@dataclass
class PromoteParams:
    """The promotion gate (``registry/gate.py``): champion and challenger compared paired, on the same
    images, with a bootstrap interval (cells resampled) on the difference of ``metric``."""

    metric: str = "val_macro_f1"  # headline metric (<split>_accuracy or <split>_macro_f1) the challenger must win on
    min_improvement: float = 0.0  # the interval's lower bound must exceed this (0: better, beyond noise)
    per_class_tolerance: float = 0.02  # largest per-class F1 drop accepted
    floor: float = 0.80  # the first model must reach this on `metric`
    bootstrap_samples: int = 2000  # resamples of the cells for the paired interval
    confidence: float = 0.95  # the interval's level
    bootstrap_seed: int = 0  # the resampling's seed: the same answers always get the same decision
    min_shared_cells: int = 20  # fewer cells answered by both models: no comparison, refuse


@dataclass
class RetrainParams:
    """Retraining on the pathologists' corrections (``flows/retraining.py``) and its promotion gate."""

    mode: str = "head"  # "head": new head on the champion's unchanged backbone (cached embeddings); "finetune": full two-phase training
    holdout_fraction: float = 0.25  # share of corrections (by image sha256) kept for evaluation, never trained on
    max_raw_images_per_cell: int = 8  # augmented copies per original raw cell in a head retrain (0 = all)
    correction_views: int = 4  # dihedral views of each correction image used as training samples (1, 2, 4 or 8)
    corrections_share: float = (
        0.5  # share of the total sample weight given to the corrections (classes balanced within each source)
    )
    head_epochs: int = 60
    head_learning_rate: float = 1e-3
    # The gate (paired, as the training flow's; the bootstrap's settings are promote:'s):
    metric: str = "holdout_accuracy"  # the challenger must win on this (the new site's held-out corrections)
    min_improvement: float = 0.0  # ... the paired interval's lower bound above this
    per_class_tolerance: float = 0.10  # largest per-class F1 drop accepted on the holdout
    guard_metric: str = "test_accuracy"  # the challenger may not be worse on this (official TEST) ...
    # ... beyond this margin: the paired interval's lower bound above -margin (TEST's ~71 cells: two
    # runs of one recipe differ by up to ~5 points there; benchmarks/gate_noise.py measures it)
    guard_tolerance: float = 0.05
    min_holdout: int = 4  # fewer held-out corrections (cells) than this: nothing can be judged, refuse


@dataclass
class Params:
    seed: int = 42
    prepare: PrepareParams = field(default_factory=PrepareParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    open_set: OpenSetParams = field(default_factory=OpenSetParams)
    export: ExportParams = field(default_factory=ExportParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value``, for logging to MLflow."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


def _apply(target: Any, overrides: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown parameter {where}{key!r} (known: {', '.join(sorted(known))})")
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"parameter {where}{key} must be a mapping")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(target, key, type(current)(value))


def load_params(path: Path | None = Path("params.yaml"), profile: str | None = None) -> Params:
    """Defaults, then the file's values, then the named profile's overrides."""
    params = Params()
    raw: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        raw = yaml.safe_load(Path(path).read_text()) or {}
    profiles = raw.pop("profiles", {}) or {}
    _apply(params, raw, "")
    if profile:
        if profile not in profiles:
            raise ValueError(f"unknown profile {profile!r} (known: {', '.join(sorted(profiles)) or 'none'})")
        _apply(params, profiles[profile], "")
    return params
