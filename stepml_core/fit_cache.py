"""One cache for fitted things (pooled H1 folds, request calibrations): JSON files keyed by content, not time.

key = sha256(code digest | the caller's parts), where the code digest hashes every ``.py`` file of the packages the
fit depends on (named by the caller, e.g. ``("study", "stepmodels", "features")``): an edit anywhere in those
packages invalidates the entries, with no hand-kept list of files. Writes are atomic (temp file + rename); a
damaged entry reads as missing and is refitted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

CORE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def code_digest(packages: tuple[str, ...]) -> str:
    """sha256 over the source of the named core packages or modules (``"sim"``, ``"catalog.py"``), in path order."""
    h = hashlib.sha256()
    for name in packages:
        target = CORE_DIR / name
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for p in files:
            h.update(str(p.relative_to(CORE_DIR)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def content_key(packages: tuple[str, ...], parts: Iterable[str], length: int = 32) -> str:
    """The cache key of one fit: its code digest and its inputs' parts (already strings, order kept)."""
    return hashlib.sha256("|".join([code_digest(packages), *parts]).encode()).hexdigest()[:length]


class FitCache:
    """Fitted results as ``<folder>/<key>.json``; ``prune=False`` keeps entries a later study does not use."""

    def __init__(self, folder, *, prune: bool = True, default: Callable | None = None):
        self.folder = Path(folder)
        self.prune = prune
        self._default = default

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.json").is_file()

    def get_json(self, key: str):
        p = self.folder / f"{key}.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return None  # a damaged entry is refitted

    def put_json(self, key: str, value) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value, default=self._default))
        tmp.replace(self.folder / f"{key}.json")  # atomic: readers never see half a file

    def keep_only(self, keys: Iterable[str]) -> None:
        """Drop the entries the current study no longer has (the cache stays one study in size)."""
        if not self.prune or not self.folder.is_dir():
            return
        keep = {f"{k}.json" for k in keys}
        for p in self.folder.glob("*.json"):
            if p.name not in keep:
                p.unlink(missing_ok=True)
