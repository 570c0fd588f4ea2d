"""A checkpoint's safetensors files: which file holds which tensor, read one tensor at a time.

A checkpoint is one ``.safetensors`` file or a directory of them; in a directory,
``model.safetensors.index.json`` (its ``weight_map``: tensor name -> file name) lists the shards, else
every ``*.safetensors`` file is one and their headers say what they hold. Nothing is read up front but
the headers (names, dtypes, shapes); :meth:`ShardedCheckpoint.read` opens the shard, copies one tensor
(or a range of its rows) out of the memory map and closes it, so the host holds about one tensor at a
time, never a whole shard.

Every error names the file, and the tensor where there is one: a missing shard is a
``FileNotFoundError``; a corrupt or truncated one (safetensors' "header too large", "incomplete
metadata"), an index that points at the wrong shard, or a tensor of the wrong dtype or shape is a
:class:`CheckpointError`; a tensor the checkpoint lacks is a ``KeyError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype codes -> torch (those a checkpoint of this project's models can hold).
TORCH_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
}
FLOATING = ("BF16", "F16", "F32", "F64")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as expected; the message names the file (and the tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a shard's header describes it."""

    name: str
    file: Path
    dtype: str  # the safetensors code, e.g. "U8", "BF16"
    shape: tuple[int, ...]


def _open(file: Path, caller: str) -> Any:
    """``safe_open`` on ``file``, with its errors naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise FileNotFoundError(f"{caller}: checkpoint file {file} does not exist") from None
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{caller}: {file} is not a readable safetensors file ({error}); it is corrupt or truncated "
            "(an interrupted download or copy?): fetch it again"
        ) from None


def checkpoint_files(path: str | Path, caller: str) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of a checkpoint and, when an index lists them, its weight map."""
    path = Path(path)
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"{caller}: {path} is neither a file nor a directory")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{caller}: {index} is not a safetensors index with a weight_map ({error!r})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                held = sorted(name for name, shard in weight_map.items() if path / shard == file)
                raise FileNotFoundError(f"{caller}: checkpoint file {file} is missing; {index.name} lists it as "
                                        f"holding {len(held)} tensor(s), e.g. {held[0]}")
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{caller}: no *.safetensors files in {path}")
    return files, None


class ShardedCheckpoint:
    """The headers of every shard of a checkpoint, and tensor-by-tensor reads from them."""

    def __init__(self, path: str | Path, caller: str) -> None:
        self.path, self.caller = Path(path), caller
        files, weight_map = checkpoint_files(path, caller)
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self._read_header(file)
        if weight_map is not None:
            self._check_index(weight_map)

    def _read_header(self, file: Path) -> None:
        with _open(file, self.caller) as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                self.tensors[name] = TensorInfo(name, file, piece.get_dtype(), tuple(piece.get_shape()))

    def _check_index(self, weight_map: dict[str, str]) -> None:
        for name, shard in weight_map.items():
            found = self.tensors.get(name)
            if found is None or found.file != self.path / shard:
                where = f"it is in {found.file.name}" if found else "no shard holds it"
                raise CheckpointError(f"{self.caller}: {self.path / INDEX_FILE} puts {name} in {shard}, but {where}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        found = self.tensors.get(name)
        if found is None:
            raise KeyError(f"{self.caller}: {name} not found in {self.path}")
        return found

    def check(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...], what: str) -> TensorInfo:
        """The tensor's header entry, after checking its dtype (one of ``dtypes``) and shape (``what``: in words)."""
        found = self.info(name)
        if found.dtype not in dtypes:
            raise CheckpointError(f"{self.caller}: {found.file}: {name} has dtype {found.dtype}; expected "
                                  f"{' or '.join(dtypes)}")
        if found.shape != tuple(shape):
            raise CheckpointError(f"{self.caller}: {found.file}: {name} has shape {list(found.shape)}; expected "
                                  f"{what} = {list(shape)}")
        return found

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (CPU, as stored), or only its rows ``start:stop`` along the first dimension."""
        found = self.info(name)
        with _open(found.file, self.caller) as handle:  # closed (memory map released) after each tensor
            try:
                if rows is None:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[rows[0] : rows[1]].contiguous()
            except Exception as error:  # a file changed or cut short since its header was read
                raise CheckpointError(f"{self.caller}: {found.file}: reading {name} failed: {error}") from error
