"""On-disk cache of generated kernel sources, loaded with importlib (never pickle).

Entry points: :class:`KernelCache`, :func:`default_cache_dir`, :func:`kernel_cache_key`.

An entry is two files named by its key: ``<key>.py`` (the kernel module's source) and
``<key>.json`` (metadata, including the sha256 of the source). The key is the sha256 of the
source, the kernel config, the Triton version and the device capability, like Triton's own cache.
Files are written to a temporary file and moved into place with ``os.replace``, so readers never
see half an entry; the metadata is written last and is what makes an entry valid. An entry whose
metadata does not parse, names another key, or hashes to a different source is rebuilt; so is one
whose files are symbolic links (the rebuild replaces the link, never the file it points to). A
directory that cannot be written raises :class:`~attnopt.errors.BackendError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from attnopt.errors import BackendError

#: Bumped when the entry layout changes; older entries are then rebuilt.
CACHE_FORMAT = 1
_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")


def default_cache_dir() -> Path:
    """The cache directory: ``$ATTNOPT_CACHE_DIR`` if set, else ``~/.cache/attnopt``.

    This is the one place attnopt reads ``ATTNOPT_CACHE_DIR``.

    Returns:
        The directory path (not created here).
    """
    override = os.environ.get("ATTNOPT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "attnopt"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def kernel_cache_key(source: str, config_json: str, triton_version: str, device: str) -> str:
    """The cache key of one kernel.

    Args:
        source: the kernel module's source text.
        config_json: the kernel config as canonical JSON.
        triton_version: ``triton.__version__``.
        device: the device capability string (e.g. ``"cuda-sm90"``, ``"interpreter"``).

    Returns:
        64 lowercase hex digits.
    """
    material = json.dumps(
        {
            "format": CACHE_FORMAT,
            "source": source,
            "config": config_json,
            "triton": triton_version,
            "device": device,
        },
        sort_keys=True,
    )
    return _sha256(material)


def validate_key(key: str) -> str:
    """Check that ``key`` is a cache key, so it cannot name a path outside the cache directory.

    Args:
        key: the candidate key.

    Returns:
        ``key`` unchanged.

    Raises:
        ValueError: if ``key`` is not 64 lowercase hex digits.
    """
    if not isinstance(key, str) or _KEY_PATTERN.fullmatch(key) is None:
        raise ValueError(f"invalid kernel cache key {key!r}: expected 64 lowercase hex digits")
    return key


@dataclass
class CacheStats:
    """What a :class:`KernelCache` did since it was created.

    Attributes:
        hits: lookups that found a valid entry.
        misses: lookups that found nothing and wrote a new entry.
        rebuilds: lookups that found a corrupt or foreign entry and replaced it.
    """

    hits: int = 0
    misses: int = 0
    rebuilds: int = 0


class KernelCache:
    """A directory of generated kernel modules keyed by sha256.

    Args:
        directory: where entries live; None means :func:`default_cache_dir`. Created on first
            write.
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.stats = CacheStats()
        #: "hit", "miss" or "rebuilt" for the most recent :meth:`get_or_create`.
        self.last_outcome: str | None = None

    def __repr__(self) -> str:
        return f"KernelCache({str(self.directory)!r})"

    def paths(self, key: str) -> tuple[Path, Path]:
        """The source and metadata paths of an entry.

        Args:
            key: a cache key (validated).

        Returns:
            ``(source_path, metadata_path)``.

        Raises:
            ValueError: if ``key`` is not a valid key.
        """
        validate_key(key)
        return self.directory / f"{key}.py", self.directory / f"{key}.json"

    def lookup(self, key: str) -> Path | None:
        """The source path of a valid entry, or None when absent, corrupt or foreign.

        Args:
            key: a cache key.

        Returns:
            The ``.py`` path, or None.
        """
        source_path, meta_path = self.paths(key)
        if source_path.is_symlink() or meta_path.is_symlink():
            return None  # an entry is two files of this directory, never a link to elsewhere
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
            source = source_path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return None
        if not isinstance(metadata, dict):
            return None
        valid = (
            metadata.get("format") == CACHE_FORMAT
            and metadata.get("key") == key
            and metadata.get("source_sha256") == _sha256(source)
        )
        return source_path if valid else None

    def get_or_create(self, key: str, source: str, metadata: dict[str, object]) -> Path:
        """Return the entry for ``key``, writing it from ``source`` when missing or invalid.

        Args:
            key: the cache key of ``source`` (see :func:`kernel_cache_key`).
            source: the module text to store.
            metadata: extra JSON-serialisable facts to record (kernel name, config, ...).

        Returns:
            The path of the entry's ``.py`` file.

        Raises:
            BackendError: the directory cannot be created or written (names it and
                ``ATTNOPT_CACHE_DIR``).
        """
        found = self.lookup(key)
        if found is not None and found.read_text(encoding="utf-8") == source:
            self.stats.hits += 1
            self.last_outcome = "hit"
            return found
        source_path, meta_path = self.paths(key)
        existed = any(path.exists() or path.is_symlink() for path in (source_path, meta_path))
        record = {
            **metadata,
            "format": CACHE_FORMAT,
            "key": key,
            "source_sha256": _sha256(source),
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic_write(source_path, source)
            _atomic_write(meta_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        except OSError as err:
            raise BackendError(
                f"cannot write the kernel cache directory {str(self.directory)!r} "
                f"({type(err).__name__}: {err.strerror or err}): set ATTNOPT_CACHE_DIR to a "
                "writable directory"
            ) from err
        if existed:
            self.stats.rebuilds += 1
            self.last_outcome = "rebuilt"
        else:
            self.stats.misses += 1
            self.last_outcome = "miss"
        return source_path

    def load_module(self, key: str, source: str, metadata: dict[str, object]) -> ModuleType:
        """Get (or write) the entry for ``key`` and import it from its file.

        The module is imported from the cache path so that ``inspect.getsource`` (which Triton
        uses) sees the real file; it is registered in ``sys.modules`` as
        ``attnopt_kernel_<key prefix>``.

        Args:
            key: the cache key of ``source``.
            source: the module text.
            metadata: extra facts for the metadata file.

        Returns:
            The imported module.
        """
        path = self.get_or_create(key, source, metadata)
        name = f"attnopt_kernel_{key[:24]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import kernel module from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module


def _atomic_write(path: Path, text: str) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
