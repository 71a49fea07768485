"""Find the white blood cell in a smear image and crop a square around it.

Used identically at training and serving time. The stained nucleus is the one strongly blue–violet
object in a Romanowsky/Giemsa smear: red cells are pink (red > blue), background is grey/cream,
rotation wedges are black, so ``blue - green`` separates the nucleus on both sites without a
learned model. The crop side follows the nucleus size, which normalises the magnification
difference between laboratories (the red cells in the crop keep the relative scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

# Working resolution: the short side is reduced to about this many pixels before segmentation.
_WORK_SHORT_SIDE = 120
# blue - green (0..255 scale) above which a pixel counts as nucleus stain.
_NUCLEUS_BG_DIFF = 45
# A nucleus darker than the background: max channel below this (excludes pale blue background).
_NUCLEUS_MAX_VALUE = 250
# A component smaller than this share of the frame is a platelet or noise, not a nucleus.
_MIN_NUCLEUS_FRACTION = 0.004
# Several white cells can share a frame; the labelled one is usually nearer the centre, so a
# component's area is weighted by 1 / (1 + (distance from centre / (this x short side))^2).
_CENTRE_PRIOR_SCALE = 0.5
# Components of at least this share of the chosen one's area, whose gap to it is at most this
# fraction of its extent, are lobes of the same nucleus (segmented neutrophils, eosinophils).
_LOBE_MIN_SHARE = 0.04
_LOBE_MAX_GAP = 0.12
# Pixels darker than this in every channel are a rotation wedge (outside the original picture).
_WEDGE_MAX_VALUE = 30
# The nucleus counts as cut when the frame's border or a wedge comes within this many working
# pixels of it (the mask's opening shaves about one pixel off a nucleus cut by the border).
_EDGE_MARGIN = 2
# Crop side = factor x the nucleus' bounding-box side, clamped to a share of the frame's short side.
_CROP_FACTOR = 1.9
_CROP_MIN_SHARE = 0.35
_CROP_MAX_SHARE = 1.0


# Everything above that shapes a crop. Cached embeddings are keyed by it (model.py), so a change
# here is never answered with vectors of the old crops.
CROP_SIGNATURE = (
    f"{_WORK_SHORT_SIDE}:{_NUCLEUS_BG_DIFF}:{_NUCLEUS_MAX_VALUE}:{_MIN_NUCLEUS_FRACTION}:"
    f"{_CENTRE_PRIOR_SCALE}:{_LOBE_MIN_SHARE}:{_LOBE_MAX_GAP}:{_CROP_FACTOR}:{_CROP_MIN_SHARE}:"
    f"{_CROP_MAX_SHARE}"
)


@dataclass(frozen=True)
class WbcBox:
    """Square crop box in input-pixel coordinates; ``found`` is False for the centre-crop fallback."""

    cx: float
    cy: float
    side: float
    found: bool
    nucleus_fraction: float  # nucleus pixels / frame pixels (0 when not found)
    # The nucleus touches the frame's border or a black rotation wedge: part of the cell is likely
    # out of the picture (the labelled cell may even be one only partly in view).
    at_edge: bool = False


def _as_array(rgb: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(rgb, Image.Image):
        rgb = np.asarray(rgb.convert("RGB"))
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr[..., :3]


def _downscale(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Box-filter downscale by an integer factor (PIL's reduce: fast, and no aliasing)."""
    h, w = arr.shape[:2]
    f = max(1, int(round(min(h, w) / _WORK_SHORT_SIDE)))
    if f == 1:
        return arr.astype(np.int16), 1
    small = Image.fromarray(np.ascontiguousarray(arr)).reduce(f)
    return np.asarray(small, dtype=np.int16), f


def _stain_mask(small: np.ndarray) -> np.ndarray:
    """Boolean nucleus-stain mask of an image at working resolution (see :func:`_downscale`)."""
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    mask = ((b - g) > _NUCLEUS_BG_DIFF) & (b > r) & (small.max(axis=2) < _NUCLEUS_MAX_VALUE)
    # Opening removes JPEG chroma fringes along wedge edges and specks; closing joins a lobed
    # nucleus whose lobes are a pixel or two apart.
    mask = ndi.binary_opening(mask, iterations=1)
    return ndi.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=2)


def locate_wbc(rgb: np.ndarray | Image.Image) -> WbcBox:
    """Locate the stained nucleus of the white blood cell and return a square box around the cell.

    Among nucleus-stain components large enough not to be platelets, the one with the largest
    centre-weighted area is chosen and nearby lobes are merged; the box is centred on their
    bounding box and sized from it. Nothing found: centre square of the frame, ``found=False``.
    """
    arr = _as_array(rgb)
    h, w = arr.shape[:2]
    short = min(h, w)
    fallback = WbcBox(cx=w / 2, cy=h / 2, side=float(short), found=False, nucleus_fraction=0.0)

    small, f = _downscale(arr)  # once: the stain mask and the wedge test both work on it
    mask = _stain_mask(small)
    labels, n = ndi.label(mask)
    if n == 0:
        return fallback
    areas = np.bincount(labels.ravel())[1:].astype(np.float64)
    big = areas >= _MIN_NUCLEUS_FRACTION * mask.size
    if not big.any():
        return fallback
    cys, cxs = np.asarray(ndi.center_of_mass(mask, labels, np.arange(1, n + 1))).reshape(n, 2).T
    sh, sw = mask.shape
    dist_c = np.hypot(cys - (sh - 1) / 2, cxs - (sw - 1) / 2) / (_CENTRE_PRIOR_SCALE * min(sh, sw))
    score = np.where(big, areas / (1.0 + dist_c**2), -1.0)
    chosen = int(np.argmax(score)) + 1

    # Merge lobes: sizeable components whose nearest pixel is close to the chosen one.
    main = labels == chosen
    ys, xs = np.nonzero(main)
    extent = max(np.ptp(ys), np.ptp(xs)) + 1
    keep = main
    if n > 1:
        dist = ndi.distance_transform_edt(~main)
        for lab in range(1, n + 1):
            if lab == chosen or areas[lab - 1] < _LOBE_MIN_SHARE * areas[chosen - 1]:
                continue
            comp = labels == lab
            if dist[comp].min() <= _LOBE_MAX_GAP * extent:
                keep = keep | comp
    ys, xs = np.nonzero(keep)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    wedge = small.max(axis=2) < _WEDGE_MAX_VALUE
    at_edge = bool(
        min(y0, x0, sh - y1, sw - x1) <= _EDGE_MARGIN
        or (wedge & (ndi.distance_transform_edt(~keep) <= _EDGE_MARGIN)).any()
    )
    nuc_side = max(y1 - y0, x1 - x0) * f
    side = float(np.clip(_CROP_FACTOR * nuc_side, _CROP_MIN_SHARE * short, _CROP_MAX_SHARE * short))
    return WbcBox(
        cx=(x0 + x1) / 2 * f,
        cy=(y0 + y1) / 2 * f,
        side=side,
        found=True,
        nucleus_fraction=float(keep.sum()) / keep.size,
        at_edge=at_edge,
    )


def _fill_colour(arr: np.ndarray) -> np.ndarray:
    """Median colour of the non-black pixels: a neutral background for out-of-frame areas."""
    sub = arr[::4, ::4].reshape(-1, 3)
    bright = sub[sub.max(axis=1) > 30]
    return np.median(bright if len(bright) else sub, axis=0).astype(np.uint8)


def crop_box(rgb: np.ndarray | Image.Image, box: WbcBox) -> np.ndarray:
    """Cut ``box`` out of the image at full resolution, padding out-of-frame areas neutrally."""
    arr = _as_array(rgb)
    h, w = arr.shape[:2]
    side = max(1, int(round(box.side)))
    x0 = int(round(box.cx - side / 2))
    y0 = int(round(box.cy - side / 2))
    out = np.empty((side, side, 3), np.uint8)
    out[:] = _fill_colour(arr)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def locate_and_crop(rgb: np.ndarray | Image.Image, size: int) -> tuple[np.ndarray, WbcBox]:
    """Square crop around the white blood cell, resized to ``size`` x ``size`` RGB uint8, and the
    box it was cut from."""
    arr = _as_array(rgb)
    box = locate_wbc(arr)
    resized = Image.fromarray(crop_box(arr, box)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8), box


def crop_wbc(rgb: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """Square crop around the white blood cell, resized to ``size`` x ``size`` RGB uint8."""
    return locate_and_crop(rgb, size)[0]


def cell_in_view(box: WbcBox) -> str:
    """What a reader of a prediction should know about the picture: ``whole`` (a nucleus fully in
    the picture), ``cut`` (cut by the frame or a rotation wedge) or ``none`` (no nucleus found:
    the model saw the centre of the frame, and its label is a guess)."""
    return "none" if not box.found else "cut" if box.at_edge else "whole"
