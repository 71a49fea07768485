"""Read a PyTorch ``state_dict`` checkpoint into numpy arrays, without torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. So the unpickler
here is an allow-list: it resolves only the few globals a plain tensor state dict needs and refuses
everything else before anything is called. Both on-disk layouts are read:

- legacy (torch < 1.6): a stream of pickles (magic number, protocol, sys info, the object, storage keys)
  followed by each storage's raw bytes, each preceded by its element count;
- zip (torch >= 1.6): ``<name>/data.pkl`` plus one raw file per storage under ``<name>/data/``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TorchCheckpointError", "UnsafeCheckpointError", "load_torch_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# numpy has no bfloat16: it is read as uint16 and widened to float32 (the upper 16 bits of a float32).
_BFLOAT16 = np.dtype("<u2")
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchCheckpointError(ValueError):
    """The file is not a PyTorch tensor checkpoint this reader understands."""


class UnsafeCheckpointError(TorchCheckpointError):
    """The pickle references a global outside the allow-list (it could run arbitrary code)."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: np.dtype


@dataclass(slots=True)
class _Storage:
    """A storage whose bytes may only arrive after the pickle (legacy layout)."""

    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> _TensorRef:
    # Same signature as torch._utils._rebuild_tensor_v2; the data is materialised later.
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError("tensor rebuilt from something that is not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _TensorRef:
    # nn.Parameter wraps a tensor; a state dict only needs the tensor.
    if not isinstance(data, _TensorRef):
        raise TorchCheckpointError("parameter rebuilt from something that is not a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come back as `_Storage` placeholders."""

    def __init__(self, file: io.BytesIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name}: only plain tensor state dicts are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # legacy: ('storage', type, key, location, numel, view_metadata); zip: the first five.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise TorchCheckpointError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"unsupported storage type {storage_type!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise TorchCheckpointError("storage views (torch < 0.4 checkpoints) are not supported")
        storage = self._storages.setdefault(key, _Storage(storage_type.dtype, numel))
        if storage.dtype != storage_type.dtype:
            raise TorchCheckpointError(f"storage {key} used with two dtypes")
        return storage


def _materialise(ref: _TensorRef) -> np.ndarray:
    flat = ref.storage.data
    if flat is None:
        raise TorchCheckpointError("tensor references a storage with no data in the file")
    n_items = int(np.prod(ref.shape, dtype=np.int64))
    if n_items == 0:
        return np.zeros(ref.shape, dtype=flat.dtype)
    # Strides come from the file: bound them so as_strided cannot read outside the storage.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= flat.size:
        raise TorchCheckpointError("tensor view lies outside its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], shape=ref.shape, strides=[s * flat.itemsize for s in ref.stride], writeable=False
    )
    array = np.array(view, order="C")  # copy: detach from the file buffer
    if flat.dtype == _BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _load_legacy(raw: bytes) -> tuple[Any, dict[str, _Storage]]:
    stream = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}

    def next_pickle() -> Any:
        return _RestrictedUnpickler(stream, storages).load()

    if next_pickle() != _LEGACY_MAGIC:
        raise TorchCheckpointError("not a PyTorch checkpoint (wrong magic number)")
    if next_pickle() != _LEGACY_PROTOCOL:
        raise TorchCheckpointError("unsupported legacy PyTorch protocol version")
    sys_info = next_pickle()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise TorchCheckpointError("big-endian checkpoints are not supported")
    obj = next_pickle()
    keys = next_pickle()
    # After the key list: for each storage, an int64 element count and then its raw bytes.
    pos = stream.tell()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise TorchCheckpointError(f"storage {key} is in the file but not in the object")
        numel = int(np.frombuffer(raw, "<i8", count=1, offset=pos)[0])
        pos += 8
        nbytes = numel * storage.dtype.itemsize
        if numel < 0 or pos + nbytes > len(raw):
            raise TorchCheckpointError("checkpoint is truncated")
        storage.data = np.frombuffer(raw, storage.dtype, count=numel, offset=pos)
        pos += nbytes
    return obj, storages


def _load_zip(path: Path) -> tuple[Any, dict[str, _Storage]]:
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchCheckpointError("zip file is not a PyTorch checkpoint (no <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
            raise TorchCheckpointError("big-endian checkpoints are not supported")
        obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            buffer = archive.read(f"{prefix}data/{key}")
            if len(buffer) < storage.numel * storage.dtype.itemsize:
                raise TorchCheckpointError(f"storage {key} is truncated")
            storage.data = np.frombuffer(buffer, storage.dtype, count=storage.numel)
    return obj, storages


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (name -> tensor) as name -> numpy array, without importing torch.

    Raises `UnsafeCheckpointError` if the pickle names any global outside the allow-list and
    `TorchCheckpointError` if the file is not a tensor checkpoint.
    """
    path = Path(path)
    try:
        obj, _ = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path.read_bytes())
    except (TorchCheckpointError, OSError):
        raise
    except Exception as err:  # a malformed pickle or archive can fail in many ways; name them all one way
        raise TorchCheckpointError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    # Training scripts often save {"state_dict": ...}; accept that one wrapping.
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, _TensorRef) for v in obj.values()):
        raise TorchCheckpointError("checkpoint is not a state dict (a mapping of names to tensors)")
    return {str(name): _materialise(ref) for name, ref in obj.items()}
