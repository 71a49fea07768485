"""Request images: which bytes the service accepts, and what it makes of them before the model.

Every image goes through :func:`hematovision.data.imaging.load_rgb` (the training decode path) and
the training localiser, so the service, ``hematovision predict`` and the monitoring job see an
image exactly as training did. A refused image is an :class:`ImageRejected` with a stable code;
how that becomes an HTTP answer is the API's business (``api/errors.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from hematovision.data.imaging import ImageError, image_stats, load_rgb
from hematovision.data.localize import cell_in_view, locate_and_crop

# The formats a microscope camera or LIS export produces; anything else is refused before any
# decoder runs, which also keeps PIL's rarer (and less hardened) parsers away from request bytes.
ACCEPTED_FORMATS = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
}
_OTHER_IMAGE_MAGIC = (b"GIF87a", b"GIF89a", b"RIFF", b"\x00\x00\x01\x00", b"8BPS", b"\x00\x00\x00\x0cjP")


class ImageRejected(ValueError):
    """A request image (or image reference) the service refuses; ``code`` is stable."""

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.index = code, message, index

    def as_dict(self) -> dict[str, Any]:
        """The answer in place of a bad image's prediction (batch predictions go on without it)."""
        return {"error": self.code, "detail": self.message}


@dataclass(frozen=True)
class PreparedImage:
    rgb: Any  # PIL.Image.Image
    sha256: str
    stats: dict[str, float]
    crop: np.ndarray | None = None  # the white-cell crop, when the model's input size was known
    cell_in_view: str | None = None  # whole / cut / none (localize.cell_in_view), with the crop


def prepare_image(data: bytes, crop_size: int | None = None) -> PreparedImage:
    """Check the format, decode with the training decoder, compute drift statistics and, given
    the model's input size, crop the white cell. The service crops here, on the request's own
    thread: localisation then runs in parallel across requests and overlaps the batched model
    call instead of queueing in front of it on the batcher's threads."""
    if data and not any(data.startswith(m) for magics in ACCEPTED_FORMATS.values() for m in magics):
        if any(data.startswith(m) for m in _OTHER_IMAGE_MAGIC):
            raise ImageRejected("unsupported_format", f"accepted formats: {', '.join(ACCEPTED_FORMATS)}")
        raise ImageRejected("not_an_image", f"not a {'/'.join(ACCEPTED_FORMATS)} image")
    try:
        rgb = load_rgb(data)
    except ImageError as error:
        raise ImageRejected(error.code, error.message) from error
    crop, cell = None, None
    if crop_size:
        crop, box = locate_and_crop(np.asarray(rgb), crop_size)
        cell = cell_in_view(box)
    return PreparedImage(rgb, hashlib.sha256(data).hexdigest(), image_stats(rgb), crop, cell)


def needs_review(confidence: float, threshold: float, cell: str | None) -> bool:
    """A person should look: the model is unsure, or it found no white cell to classify (on TEST
    such answers are nearly all wrong, however confident)."""
    return confidence < threshold or cell == "none"
