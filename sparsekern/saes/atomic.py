"""Write a folder all at once: build it next to its target, then rename it into place (``SAE.save_model``).

A failed write leaves an existing target exactly as it was and no temporary folder behind. Renames only,
so the new folder is made next to the target (the same file system).
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator, Optional


def new_sibling_folder(target: Path, what: str) -> Path:
    """A new, empty, hidden folder next to ``target`` (``os.mkdir``, so the umask applies, unlike mkdtemp)."""
    for _ in range(100):
        folder = target.parent / f".{target.name}.{what}-{uuid.uuid4().hex[:12]}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a temporary folder next to {target}")


def swap_in(new: Path, target: Path, replaced: Collection[str]) -> None:
    """Make the finished folder ``new`` be ``target``, with renames only.

    Entries of an existing ``target`` not named in ``replaced`` are moved into ``new`` first (and its
    permissions copied); on any failure everything is moved back, so ``target`` is left as it was.
    """
    if not target.exists():
        os.rename(new, target)
        return
    moved: list[str] = []
    old: Optional[Path] = None
    try:
        for name in os.listdir(target):
            if name not in replaced:
                os.rename(target / name, new / name)
                moved.append(name)
        shutil.copymode(target, new)
        old = new_sibling_folder(target, "old")
        os.rename(target, old)  # replaces the empty placeholder folder
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    except BaseException:
        for name in reversed(moved):
            os.rename(new / name, target / name)
        if old is not None and old.exists() and not any(old.iterdir()):
            old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: Path, replaced: Collection[str]) -> Iterator[Path]:
    """Yield an empty temporary folder to write into; when the block ends without an error it becomes
    ``path`` (a symlinked ``path``: the folder it points to). Entries of an existing ``path`` other than
    ``replaced`` are kept. On an error nothing changes and the temporary folder is removed."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_sibling_folder(target, "saving")
    try:
        yield tmp
        swap_in(tmp, target, replaced)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if the swap succeeded
