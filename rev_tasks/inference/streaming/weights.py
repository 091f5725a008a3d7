"""Reading a model folder's safetensors tensors, apart from any modelling.

A :class:`SafetensorsWeights` knows where every tensor of a folder (one file or a sharded
index) lies; a :class:`BoundWeights` reads them by the names an architecture uses, converted
to the compute dtype and device. Neither knows what a block is.

Why file reads instead of ``mmap``: pages touched through a mapping count in the process's
RSS until it is unmapped, so a long-lived ``safe_open`` would grow towards the whole file. Each
tensor is read with ``preadv`` straight into a fresh torch buffer using the offsets in the
safetensors header; the kernel's page cache (not RSS) keeps re-reads fast.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rev_tasks.inference.budget import MB
from rev_tasks.inference.loader import ModelLoadError

Tensor = torch.Tensor

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * MB
_READ_CHUNK = 1 << 30  # preadv moves at most ~2 GiB per call on Linux


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lies: file, stored dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Parse a safetensors header (8-byte length, JSON) without touching the tensor data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ModelLoadError(f"corrupt safetensors file (no header): {path}")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ModelLoadError(f"corrupt safetensors file (header length): {path}")
            header = json.loads(fh.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the safetensors header of {path}: {exc}") from exc
    data_start = 8 + header_len
    specs: dict[str, TensorSpec] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"unsupported or corrupt tensor {name!r} in {path}") from exc
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or data_start + end > size or begin < 0:
            raise ModelLoadError(f"corrupt safetensors file (tensor {name!r} out of range): {path}")
        specs[name] = TensorSpec(path, dtype, shape, data_start + begin, data_start + end)
    return specs


def _preadv_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done : done + _READ_CHUNK]], offset + done)
        if n <= 0:
            raise ModelLoadError(f"truncated safetensors file: {path}")
        done += n


def _byte_view(t: Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


class SafetensorsWeights:
    """The tensors of a model folder (single file or sharded index), read on demand."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        self.specs: dict[str, TensorSpec] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"invalid {index.name} in {folder}") from exc
            for shard in sorted(set(weight_map.values())):
                shard_path = (folder / shard).resolve()
                if shard_path.parent != folder.resolve() or not shard_path.is_file():
                    raise ModelLoadError(f"missing weight shard {shard} in {folder}")
                self.specs.update(read_safetensors_header(shard_path))
        elif (folder / "model.safetensors").is_file():
            self.specs = read_safetensors_header(folder / "model.safetensors")
        else:
            raise ModelLoadError(
                f"streamed execution needs safetensors weights; {folder} has only pickle weights"
            )

    def read(self, spec: TensorSpec, into: Tensor | None = None) -> Tensor:
        """The whole tensor in its stored dtype: a fresh CPU buffer (not a mapping), or the
        first ``spec.nbytes`` of the uint8 buffer ``into`` (the GPU path's pinned staging)."""
        buf = torch.empty(spec.nbytes, dtype=torch.uint8) if into is None else into[: spec.nbytes]
        if spec.nbytes:
            fd = os.open(spec.file, os.O_RDONLY)
            try:
                _preadv_into(fd, _byte_view(buf), spec.start, spec.file)
            finally:
                os.close(fd)
        return buf.view(spec.dtype).view(spec.shape)

    def read_rows(self, spec: TensorSpec, rows: Sequence[int]) -> Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D tensor, consecutive rows read in one go."""
        if len(spec.shape) != 2:
            raise ModelLoadError(f"expected a matrix, found shape {spec.shape} in {spec.file}")
        n_rows = spec.shape[0]
        row_bytes = spec.nbytes // n_rows if n_rows else 0
        if rows and (rows[0] < 0 or rows[-1] >= n_rows):
            raise ModelLoadError(f"token id out of range 0..{n_rows - 1} in {spec.file}")
        buf = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
        view = _byte_view(buf)
        fd = os.open(spec.file, os.O_RDONLY)
        try:
            i = 0
            while i < len(rows):
                j = i + 1
                while j < len(rows) and rows[j] == rows[j - 1] + 1:
                    j += 1
                _preadv_into(
                    fd,
                    view[i * row_bytes : j * row_bytes],
                    spec.start + rows[i] * row_bytes,
                    spec.file,
                )
                i = j
        finally:
            os.close(fd)
        return buf.view(spec.dtype).view(len(rows), spec.shape[1])


class BoundWeights:
    """Weights seen through a model's checkpoint prefix, converted to the compute dtype/device.

    ``from_pretrained(dtype=float32)`` upcasts stored fp16/bf16 weights with an exact cast; the
    same ``.to()`` here keeps streamed and in-memory weights bit-identical.
    """

    _ALIASES = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"))

    def __init__(
        self, files: SafetensorsWeights, prefix: str, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.files = files
        self.prefix = prefix
        self.dtype = dtype
        self.device = device
        self._pinned: Tensor | None = None

    def spec(self, name: str) -> TensorSpec:
        full = self.prefix + name
        found = self.files.specs.get(full)
        if found is None:
            for new, old in self._ALIASES:
                if full.endswith(new):
                    found = self.files.specs.get(full[: -len(new)] + old)
        if found is None:
            raise ModelLoadError(f"weight {full!r} is missing from the checkpoint")
        return found

    def has(self, name: str) -> bool:
        try:
            self.spec(name)
        except ModelLoadError:
            return False
        return True

    def _convert(self, t: Tensor) -> Tensor:
        if self.device.type != "cpu":
            t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def read(self, name: str) -> Tensor:
        spec = self.spec(name)
        if self.device.type == "cuda":
            return self._read_cuda(spec)
        return self._convert(self.files.read(spec))

    def _read_cuda(self, spec: TensorSpec) -> Tensor:
        """File → one reused pinned host buffer → device, then the dtype cast on the device.

        A fresh pageable buffer per tensor costs a page fault per 4 KB and a staged (slow)
        host-to-device copy; the pinned buffer (as large as the largest tensor, kept for the
        model's life) makes each block's upload one DMA copy. The copy is synchronous, so the
        buffer is free again when it returns.
        """
        if self._pinned is None or self._pinned.numel() < spec.nbytes:
            self._pinned = None
            self._pinned = torch.empty(spec.nbytes, dtype=torch.uint8, pin_memory=True)
        host = self.files.read(spec, into=self._pinned)
        dev = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
        dev.copy_(host.view(torch.uint8).view(-1))
        t = dev.view(spec.dtype).view(spec.shape)
        return t.to(self.dtype) if t.is_floating_point() else t

    def read_rows(self, name: str, rows: Sequence[int]) -> Tensor:
        return self._convert(self.files.read_rows(self.spec(name), rows))

    def compute_bytes(self, name: str) -> int:
        spec = self.spec(name)
        if not spec.dtype.is_floating_point:
            return spec.nbytes
        return spec.numel * torch.empty((), dtype=self.dtype).element_size()
