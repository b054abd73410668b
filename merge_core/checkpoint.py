"""Checkpoint I/O for the merge engine: lazy readers, a streaming sharded safetensors writer, atomic output.

Memory is the constraint this module is built around: a merge touches every weight of several models once,
so the reader maps one tensor at a time (released as soon as the caller drops it) and the writer puts each
result straight at its final offset on disk. Peak memory is then the tensors the engine holds, never a whole
model or a whole shard.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import struct
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from merge_core.errors import EvomergeError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
"""What a model directory's tokenizer is made of: copied beside merged weights."""

_HEADER_LIMIT = 100 * 1000 * 1000  # same bound safetensors itself enforces on header size
_PAGE = mmap.ALLOCATIONGRANULARITY
_MAP_MIN_BYTES = 2**20


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    start: int  # absolute byte offset of the data in ``file``
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _read_safetensors_header(model: Path, file: Path) -> dict[str, _StoredTensor]:
    """Tensor locations from the header alone; also rejects truncated files, which would crash on mmap."""
    where = f"model {model}: {file.name}"
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            (header_len,) = struct.unpack("<Q", handle.read(8).ljust(8, b"\0"))
            if not 2 <= header_len <= min(_HEADER_LIMIT, size - 8):
                raise EvomergeError(f"{where} is not a safetensors file (bad header length)")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise EvomergeError(f"{where} cannot be read: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvomergeError(f"{where} is not a safetensors file (unreadable header)") from None
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise EvomergeError(f"{where}: tensor {name!r} has an unsupported or malformed header entry") from None
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise EvomergeError(f"{where}: tensor {name!r} has offsets that do not match its shape and dtype")
        if data_start + end > size:
            raise EvomergeError(f"{where} is truncated (tensor {name!r} ends past the end of the file)")
        tensors[name] = _StoredTensor(file, data_start + begin, end - begin, shape, dtype)
    return tensors


def _read_tensor(stored: _StoredTensor) -> Tensor:
    """One tensor's bytes: large ones mapped zero-copy, small or misaligned ones read into memory.

    Each large tensor gets its own private (copy-on-write) mapping, so its pages leave the process as soon
    as the tensor is freed; one mapping for the whole file would keep every page ever touched resident, i.e.
    whole models. Small tensors (norms, biases) are cheaper to copy than to map, and copying is also the
    fallback when the process runs out of mappings (vm.max_map_count), e.g. with many-expert models.
    """
    if stored.nbytes >= _MAP_MIN_BYTES and stored.start % stored.dtype.itemsize == 0:
        try:
            return _map_tensor(stored)
        except OSError:
            pass
    return _copy_tensor(stored)


def _map_tensor(stored: _StoredTensor) -> Tensor:
    page_start = stored.start - stored.start % _PAGE
    with open(stored.file, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), stored.start + stored.nbytes - page_start,
                            access=mmap.ACCESS_COPY, offset=page_start)
    mapping.madvise(mmap.MADV_WILLNEED)  # cold files: read the whole tensor ahead, not fault by fault
    flat = torch.frombuffer(mapping, dtype=torch.uint8, count=stored.nbytes, offset=stored.start - page_start)
    return flat.view(stored.dtype).view(stored.shape)


def _copy_tensor(stored: _StoredTensor) -> Tensor:
    tensor = torch.empty(stored.shape, dtype=stored.dtype)
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    with open(stored.file, "rb", buffering=0) as handle:
        handle.seek(stored.start)
        while buffer:
            count = handle.readinto(buffer)
            if not count:
                raise EvomergeError(f"model {stored.file.parent}: {stored.file.name} was truncated while in use")
            buffer = buffer[count:]
    return tensor


def _load_pickle(model: Path, file: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise EvomergeError(f"model {model}: {file.name} not found") from None
    except Exception as exc:  # torch raises many types for bad pickles; the user needs one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvomergeError(f"model {model}: cannot load {file.name} safely: {first_line}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(t, Tensor) for t in loaded.values()):
        raise EvomergeError(f"model {model}: {file.name} is not a state dict of tensors")
    return loaded


def _read_index(model: Path, index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EvomergeError(f"model {model}: {index_file.name} is not a valid index (no weight_map)") from None
    if not isinstance(weight_map, dict):
        raise EvomergeError(f"model {model}: {index_file.name} is not a valid index (no weight_map)")
    for shard in dict.fromkeys(weight_map.values()):
        if not (model / shard).is_file():
            raise EvomergeError(f"model {model}: shard {shard} named in {index_file.name} not found")
    return weight_map


class CheckpointReader:
    """A Hugging Face model directory whose tensors are read one at a time, on demand.

    Opening reads only ``config.json`` and the safetensors headers (a few KB), so readers are cheap to
    create and to cache per path. Pickled ``.bin`` checkpoints run code when loaded, hence ``allow_pickle``.
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EvomergeError(f"model {self.path}: directory not found")
        self.config = self._read_config()
        self._stored: dict[str, _StoredTensor] = {}
        self._pickle_shards: dict[str, str] = {}
        self._pickle_cache: dict[str, dict[str, Tensor]] = {}
        self._pickle_lock = threading.Lock()
        if (self.path / SAFETENSORS_INDEX).is_file():
            self._open_safetensors(_read_index(self.path, self.path / SAFETENSORS_INDEX), SAFETENSORS_INDEX)
        elif (self.path / SAFETENSORS_FILE).is_file():
            self._stored = _read_safetensors_header(self.path, self.path / SAFETENSORS_FILE)
        elif (self.path / PICKLE_INDEX).is_file() or (self.path / PICKLE_FILE).is_file():
            self._open_pickle(allow_pickle)
        else:
            raise EvomergeError(f"model {self.path}: no weights found (expected {SAFETENSORS_FILE}, "
                                f"{SAFETENSORS_INDEX}, {PICKLE_FILE} or {PICKLE_INDEX})")

    def _read_config(self) -> dict:
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            raise EvomergeError(f"model {self.path}: {CONFIG_FILE} not found")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise EvomergeError(f"model {self.path}: {CONFIG_FILE} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise EvomergeError(f"model {self.path}: {CONFIG_FILE} is not a JSON object")
        return config

    def _open_safetensors(self, weight_map: dict[str, str], index_name: str) -> None:
        headers = {shard: _read_safetensors_header(self.path, self.path / shard)
                   for shard in dict.fromkeys(weight_map.values())}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise EvomergeError(f"model {self.path}: {index_name} puts {name!r} in {shard}, which lacks it")
            self._stored[name] = headers[shard][name]

    def _open_pickle(self, allow_pickle: bool) -> None:
        if not allow_pickle:
            raise EvomergeError(f"model {self.path}: weights are pickled (.bin), which can run code; pass "
                                f"--allow-pickle to load them with torch.load(weights_only=True)")
        if (self.path / PICKLE_INDEX).is_file():
            self._pickle_shards = _read_index(self.path, self.path / PICKLE_INDEX)
        else:
            tensors = self._pickle_cache[PICKLE_FILE] = _load_pickle(self.path, self.path / PICKLE_FILE)
            self._pickle_shards = dict.fromkeys(tensors, PICKLE_FILE)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r})"

    @property
    def names(self) -> list[str]:
        return list(self._stored or self._pickle_shards)

    def has(self, name: str) -> bool:
        return name in self._stored or name in self._pickle_shards

    __contains__ = has

    def shape(self, name: str) -> torch.Size:
        if name in self._stored:
            return torch.Size(self._stored[name].shape)
        return self._pickled(name).shape

    def dtype(self, name: str) -> torch.dtype:
        if name in self._stored:
            return self._stored[name].dtype
        return self._pickled(name).dtype

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Tensor:
        """The tensor ``name``, owned by the caller (in-place changes never reach the file or other readers)."""
        if name in self._stored:
            tensor = _read_tensor(self._stored[name])
        else:
            tensor = self._pickled(name)
            if dtype in (None, tensor.dtype):
                tensor = tensor.clone()  # the cached state dict must stay pristine for the next caller
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def _pickled(self, name: str) -> Tensor:
        if name not in self._pickle_shards:
            raise EvomergeError(f"model {self.path}: no tensor named {name!r}")
        shard = self._pickle_shards[name]
        with self._pickle_lock:
            if shard not in self._pickle_cache:
                self._pickle_cache[shard] = _load_pickle(self.path, self.path / shard)
        tensors = self._pickle_cache[shard]
        if name not in tensors:
            raise EvomergeError(f"model {self.path}: {PICKLE_INDEX} puts {name!r} in {shard}, which lacks it")
        return tensors[name]


# --------------------------------------------------------------------------------------------- writing


def parse_size(value: str | int) -> int:
    """Bytes from a shard size like mergekit's ``--out-shard-size``: ``5B`` is 5e9 (mergekit's billions);
    also ``500MB``, ``1.5G``, ``2GiB`` or a plain byte count. Units are decimal unless spelled ``KiB/MiB/GiB``.
    0 means no limit, as in mergekit."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise EvomergeError(f"shard size must not be negative: {value}")
        return value
    units = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "b": 10**9, "g": 10**9, "gb": 10**9,
             "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", str(value).lower())
    if not match or match.group(2) not in units:
        raise EvomergeError(f"bad shard size {value!r} (expected e.g. 5GB, 500MB, 1.5G or a byte count)")
    return int(float(match.group(1)) * units[match.group(2)])


def _shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _plan_shards(layout: Mapping[str, tuple[Sequence[int], torch.dtype]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in layout order: a new shard starts when the next tensor would overflow (as mergekit does)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, (shape, dtype) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and max_shard_bytes > 0 and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def _shard_header(names: list[str], layout) -> tuple[bytes, dict[str, int]]:
    """The safetensors header for one shard and each tensor's absolute file offset.

    Tensors are stored by decreasing element size (as safetensors does) so every one is naturally aligned.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    relative: dict[str, int] = {}
    cursor = 0
    for name in sorted(names, key=lambda n: -layout[n][1].itemsize):
        shape, dtype = layout[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        relative[name] = cursor
        cursor += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    data_start = 8 + len(encoded)
    return struct.pack("<Q", len(encoded)) + encoded, {name: data_start + off for name, off in relative.items()}


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def _disk_full_is_an_error(path: Path, size: int) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise EvomergeError(f"output {path}: no room for {size:,} bytes ({os.strerror(exc.errno)})") from None


class ShardedWriter:
    """Writes a safetensors checkpoint tensor by tensor, in any order, straight to its final place on disk.

    The layout is known before any data is computed, so shards and headers are laid out up front and each
    ``write`` is one positioned write: peak memory is the tensor in hand, never a shard. ``write`` may be
    called from several threads.
    """

    def __init__(self, out_dir: str | os.PathLike, layout: Mapping[str, tuple[Sequence[int], torch.dtype]], *,
                 max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.layout = {name: (torch.Size(shape), dtype) for name, (shape, dtype) in layout.items()}
        unsupported = {str(dtype) for _, dtype in self.layout.values() if dtype not in DTYPE_NAMES}
        if unsupported:
            raise ValueError(f"dtypes not storable in safetensors: {', '.join(sorted(unsupported))}")
        shards = _plan_shards(self.layout, max_shard_bytes)
        self.weight_map: dict[str, str] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        self._fds: list[int] = []
        self._paths: dict[int, Path] = {}
        self._mapped: dict[str, int] = {}  # name -> address of its destination
        self._written: set[str] = set()
        self._reserved: set[int] = set()  # shards whose disk space is taken, so mapped writes cannot fault
        self._lock = threading.Lock()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            for file_name, names in zip(_shard_file_names(len(shards)), shards):
                self._create_shard(file_name, names)
        except BaseException:
            self._close_files()
            raise

    def _create_shard(self, file_name: str, names: list[str]) -> None:
        """Lay the shard out and take its disk space now: a full disk is then a one-line error before any
        work, not a crash (SIGBUS) on a write through a mapping."""
        header, offsets = _shard_header(names, self.layout)
        size = len(header) + sum(self._nbytes(name) for name in names)
        path = self.out_dir / file_name
        with _disk_full_is_an_error(path, size):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            self._paths[fd] = path
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
                self._reserved.add(fd)
            except OSError as exc:
                if exc.errno in _DISK_FULL:  # else the file system cannot reserve: write as it comes
                    raise
        for name in names:
            self.weight_map[name] = file_name
            self._offsets[name] = (fd, offsets[name])

    def _nbytes(self, name: str) -> int:
        shape, dtype = self.layout[name]
        return math.prod(shape) * dtype.itemsize

    @property
    def total_size(self) -> int:
        return sum(self._nbytes(name) for name in self.layout)

    def destination(self, name: str) -> Tensor | None:
        """Where ``name`` lies in its shard file, mapped into memory: a method that computes into it writes
        the page cache directly, on its own threads (no output buffer, no copy, no serial write), and
        ``write`` then has nothing to copy. The mapping goes when the last view of it does.

        None where the file system could not reserve the shard's space: a store through a mapping into
        a hole of a full disk is a SIGBUS, while ``write`` reports it as an error."""
        shape, dtype = self.layout[name]
        fd, offset = self._offsets[name]
        if fd not in self._reserved:
            return None
        mapped = np.memmap(self._paths[fd], dtype=np.uint8, mode="r+", offset=offset, shape=(self._nbytes(name),))
        view = torch.from_numpy(mapped).view(dtype).view(shape)
        self._mapped[name] = view.data_ptr()
        return view

    def write(self, name: str, tensor: Tensor) -> None:
        """Store ``tensor`` (cast to the layout's dtype, moved to CPU) under ``name``; each name exactly once."""
        if name not in self.layout:
            raise ValueError(f"tensor {name!r} is not in the output layout")
        shape, dtype = self.layout[name]
        if tensor.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, layout says {tuple(shape)}")
        with self._lock:
            if name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
            self._written.add(name)
        if self._mapped.pop(name, None) == tensor.data_ptr() and tensor.dtype == dtype and tensor.is_contiguous():
            return  # computed in place
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8)
        fd, offset = self._offsets[name]
        buffer = memoryview(data.numpy())  # uint8 view: works for bf16/fp8, which numpy lacks
        with _disk_full_is_an_error(self._paths[fd], len(buffer)):
            while buffer:
                done = os.pwrite(fd, buffer, offset)
                buffer, offset = buffer[done:], offset + done

    def close(self) -> None:
        """Finish the checkpoint: fails if a tensor was never written, then writes the index when sharded."""
        self._close_files()
        missing = [name for name in self.layout if name not in self._written]
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) never written, e.g. {missing[0]!r}")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _close_files(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()


# --------------------------------------------------------------------------------------------- output dir


def check_writable_dir(path: str | Path, what: str) -> None:
    """Refuse, before minutes of work, a directory that could not be written: its nearest existing
    ancestor must be a directory that takes a file (a probe file, removed at once)."""
    path = Path(path)
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise EvomergeError(f"{what} {path}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise EvomergeError(f"{what} {path}: cannot write in {existing} ({exc.strerror})") from None


def check_output_dir(out_dir: str | os.PathLike, *, force: bool) -> Path:
    """Refuse to overwrite a non-empty ``out_dir`` unless ``force``: called before any work is done."""
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise EvomergeError(f"output {out} already exists and is not empty (pass --force to replace it)")
    return out


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` that becomes ``out_dir`` only if the block completes.

    A failed or interrupted run leaves ``out_dir`` as it was (and no temporary directory behind), so a
    directory named like the output is always a complete one.
    """
    out = check_output_dir(out_dir, force=force)
    created = [p for p in out.parents if not p.exists()][::-1]  # removed again if the merge fails
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # not mkdtemp: the output keeps the user's umask, not mode 0700
    except OSError as exc:
        _remove_empty(created)
        raise EvomergeError(f"output {out}: cannot create it ({_cannot_create(out, exc)})") from None
    try:
        yield staging
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        if isinstance(exc, EvomergeError) and str(staging) in str(exc):  # name the output, not the staging dir
            raise EvomergeError(str(exc).replace(str(staging), str(out))) from None
        written = [f for f in (getattr(exc, "filename", None), getattr(exc, "filename2", None))
                   if f is not None and str(f).startswith(str(staging))]
        if isinstance(exc, OSError) and written:
            name = Path(written[0]).relative_to(staging)
            raise EvomergeError(f"output {out}: cannot write {name} ({exc.strerror})") from None
        raise


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories a failed run created (deepest first), unless something else is in them now."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return


def _cannot_create(out: Path, exc: OSError) -> str:
    """Why ``out`` cannot be made, naming the path in the way: a parent that is a file, or the refusal."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a directory"
            break
    return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


def resolve_model_path(ref: str, recipe_dir: Path | None = None) -> Path:
    """A local directory (as given, or relative to the recipe file), else a hub id from the local HF cache.
    ``NAME@REVISION`` pins a hub revision, as in mergekit; a local directory has none (the suffix is dropped)."""
    name, revision = ref.rsplit("@", 1) if "@" in ref else (ref, None)
    for path in dict.fromkeys((ref, name)):
        for candidate in (Path(path).expanduser(), (recipe_dir / path) if recipe_dir else None):
            if candidate is not None and candidate.is_dir():
                return candidate.resolve()
    if Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise EvomergeError(f"model {ref}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:
        offline = " (offline: set HF_HUB_OFFLINE=0 to download)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise EvomergeError(f"model {ref}: not a local directory and not available from the hub{offline}: "
                            f"{type(exc).__name__}") from None


def copy_tokenizer_files(src: Path, out: Path) -> None:
    """The tokenizer of the model directory ``src`` into ``out``, file by file as it is (no re-serialization)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
