"""The on-disk cubin cache.

Where: ``$HOPPER_MXFP4_CACHE``, else ``$XDG_CACHE_HOME/hopper-mxfp4``, else ``~/.cache/hopper-mxfp4``
(read at every call, so a test or a user can point it elsewhere at any time).

Key: the sha256 of everything that decides the cubin (``cache_key``): the rendered source, the
*contents* of every project header under ``templates/`` (an edited ``.cuh`` must never serve a
stale cubin), the NVRTC options, the NVRTC version, the architecture and the versions of the
CUTLASS / CCCL / CUDA headers.

Entry: ``<root>/v1/<key[:2]>/<key>/`` holding ``kernel.cubin`` and ``meta.json`` (resources, NVRTC
log, compile time, the cubin's sha256). An entry is written into a temporary directory beside its
final place and renamed into place in one step, so several processes compiling the same kernel at
once each either publish a complete entry or find one already there; a reader never sees half an
entry. An entry whose cubin does not match its recorded hash is treated as absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1
CUBIN_FILE = "kernel.cubin"
META_FILE = "meta.json"
# Project headers whose contents go into the key (everything the template may #include).
HEADER_SUFFIXES = (".cuh", ".h", ".hpp", ".inc")


def cache_dir() -> Path:
    """The cache root (not created here)."""
    explicit = os.environ.get("HOPPER_MXFP4_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hopper-mxfp4"


def _entries_root(directory: Path | str | None) -> Path:
    return (Path(directory) if directory is not None else cache_dir()) / f"v{CACHE_FORMAT}"


_warned_roots: set[Path] = set()
_warn_lock = threading.Lock()


def unusable_reason(directory: Path | str | None = None) -> str | None:
    """Why cubins cannot be kept in the cache (``directory`` or ``cache_dir()``), or None when it works.

    Probes for real (creates the entries directory and a scratch file): permission bits do not tell,
    for example, for root or a read-only mount."""
    root = _entries_root(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".probe.", dir=root)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return f"{error.strerror or error}: {error.filename or root}"
    return None


def _warn_unusable(final: Path, error: OSError) -> None:
    root = final.parents[2]  # final is <root>/v1/<key[:2]>/<key>
    _warn_once(root, f"{error.strerror or error}: {error.filename or root}", stacklevel=4)


def _warn_once(root: Path, reason: str, stacklevel: int) -> None:
    """One warning per cache root and process: every process would otherwise recompile in silence."""
    with _warn_lock:
        if root in _warned_roots:
            return
        _warned_roots.add(root)
    warnings.warn(
        f"hopper-mxfp4: the kernel cache {root} is not usable ({reason}); compiled kernels are not kept, so every "
        "process compiles them again. Point HOPPER_MXFP4_CACHE at a writable directory ('python -m codegen doctor' "
        "checks it).",
        RuntimeWarning, stacklevel=stacklevel,
    )


def warn_if_unusable(directory: Path | str | None = None, stacklevel: int = 1) -> bool:
    """Probe the cache (``directory`` or ``cache_dir()``) and warn as ``store`` would, before any compile; True when
    it keeps cubins. For callers that compile many kernels: the warning comes first and once. ``stacklevel`` as
    ``warnings.warn``'s, counted from the caller."""
    reason = unusable_reason(directory)
    if reason is not None:
        _warn_once(Path(directory) if directory is not None else cache_dir(), reason, stacklevel=stacklevel + 2)
    return reason is None


def mark_warned(directory: Path | str | None = None) -> None:
    """Say nothing more about this cache root in this process (its unusability was already reported: by the
    parent of a compile worker, or by a command line that says it in its own words)."""
    with _warn_lock:
        _warned_roots.add(Path(directory) if directory is not None else cache_dir())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode())


def template_hashes(templates_dir: Path | str | None = None, suffixes: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{relative path: sha256 of contents}`` of the files under ``templates_dir`` (default: the project's
    ``templates/``), leaving out hidden files and Python files; ``suffixes`` keeps only those endings
    (``HEADER_SUFFIXES``: the headers a compile may include, the cache key's part). {} for no directory.

    The one hashing of the templates: the cache key and ``generate``'s manifest both read it."""
    if templates_dir is None:
        from .paths import TEMPLATES_DIR

        templates_dir = TEMPLATES_DIR
    root = Path(templates_dir)
    if not root.is_dir():
        return {}
    hashes: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.suffix in (".py", ".pyc") or (suffixes is not None and path.suffix not in suffixes):
            continue
        hashes[relative.as_posix()] = sha256_bytes(path.read_bytes())
    return hashes


def cache_key(
    *,
    source: str,
    headers: dict[str, str],
    options: list[str] | tuple[str, ...],
    nvrtc_version: tuple[int, int] | None,
    arch: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """sha256 over everything that decides the cubin. ``headers`` is ``template_hashes(dir, HEADER_SUFFIXES)``."""
    material = {
        "format": CACHE_FORMAT,
        "source": sha256_text(source),
        "headers": dict(sorted(headers.items())),
        "options": list(options),
        "nvrtc": list(nvrtc_version) if nvrtc_version else None,
        "arch": arch,
        "extra": extra or {},
    }
    return sha256_text(json.dumps(material, sort_keys=True, default=str))


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    cubin: bytes
    meta: dict[str, Any]


def entry_path(key: str, directory: Path | None = None) -> Path:
    return _entries_root(directory) / key[:2] / key


def load(key: str, directory: Path | None = None) -> CacheEntry | None:
    """The entry for ``key``, or None when absent or damaged."""
    path = entry_path(key, directory)
    try:
        cubin = (path / CUBIN_FILE).read_bytes()
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("cubin_sha256") != sha256_bytes(cubin):
        return None
    return CacheEntry(key=key, path=path, cubin=cubin, meta=meta)


def store(key: str, cubin: bytes, meta: dict[str, Any], directory: Path | None = None) -> CacheEntry:
    """Publish an entry atomically. If another process published the same key first, keep theirs.

    Never raises for a cache that cannot be written (read-only home, full disk): the compile
    result is still good, it is just not kept; the returned entry's path is then empty, and the
    first such failure per cache directory warns (RuntimeWarning).
    """
    final = entry_path(key, directory)
    meta = dict(meta, cubin_sha256=sha256_bytes(cubin), key=key, format=CACHE_FORMAT)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=final.parent))
    except OSError as error:
        _warn_unusable(final, error)
        return CacheEntry(key=key, path=Path(), cubin=cubin, meta=meta)
    try:
        (staging / CUBIN_FILE).write_bytes(cubin)
        (staging / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(staging, final)  # atomic; fails if another process got there first
        except OSError:
            existing = load(key, directory)
            if existing is not None:
                return existing
            # A damaged entry is in the way: move it aside (atomically) and try once more.
            _discard(final)
            try:
                os.rename(staging, final)
            except OSError:
                return load(key, directory) or CacheEntry(key=key, path=Path(), cubin=cubin, meta=meta)
    except OSError as error:  # a full disk, a quota
        _warn_unusable(final, error)
        return CacheEntry(key=key, path=Path(), cubin=cubin, meta=meta)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return CacheEntry(key=key, path=final, cubin=cubin, meta=meta)


def _discard(path: Path) -> None:
    try:
        graveyard = Path(tempfile.mkdtemp(prefix=".discard.", dir=path.parent))
        os.rename(path, graveyard / "entry")
        shutil.rmtree(graveyard, ignore_errors=True)
    except OSError:
        pass


def entries(directory: Path | None = None) -> list[CacheEntry]:
    """Every complete entry in the cache."""
    root = _entries_root(directory)
    found = []
    if not root.is_dir():
        return found
    for shard in sorted(root.iterdir()):
        if not shard.is_dir():
            continue
        for path in sorted(shard.iterdir()):
            if path.name.startswith("."):
                continue
            entry = load(path.name, directory)
            if entry is not None:
                found.append(entry)
    return found


def clear(directory: Path | None = None) -> int:
    """Remove every entry; returns how many there were."""
    root = _entries_root(directory)
    count = len(entries(directory))
    shutil.rmtree(root, ignore_errors=True)
    return count
