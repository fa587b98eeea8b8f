"""Claiming the output directory of ``data prepare``: never write over data silently.

A preparation writes into an empty (or new) directory. A non-empty one is refused unless the
caller asks to overwrite; an overwrite first removes the previous preparation -- and only that:
entries a preparation writes (``manifest.json``, split directories of MDS shards + ``index.json``,
the built-in corpus's ``tokenizer.model``/``.vocab`` and ``data/`` root). Anything else in the
directory (a user's own file) stops the overwrite, so ``--out ~ --overwrite`` deletes nothing
it did not write. Removing first means no stale split (an old ``val/``) outlives a new
preparation that has none.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from miras_pretrain.data.manifest import MANIFEST_NAME, is_remote

# files a preparation writes at a dataset root, in a split directory, or (built-in stdlib corpus)
# next to its data root; shards are "shard.00000.mds" (+ ".zstd" when compressed)
_PREPARED_FILES = {MANIFEST_NAME, MANIFEST_NAME + ".tmp", "index.json", "tokenizer.model",
                   "tokenizer.vocab"}
_SHARD = re.compile(r"^shard\.\d+\.mds(\.[a-z0-9]+)?$")


def _foreign_entry(path: Path) -> Path | None:
    """The first entry under directory ``path`` that no preparation writes, or None."""
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            return entry  # never follow or remove a link a person put there
        if entry.is_dir():
            foreign = _foreign_entry(entry)
            if foreign is not None:
                return foreign
        elif entry.name not in _PREPARED_FILES and not _SHARD.match(entry.name):
            return entry
    return None


def claim_output_dir(out_dir: str, *, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Make sure ``out_dir`` may receive a new preparation; with ``overwrite`` empty it first.

    ``keep`` lists input files (e.g. the tokenizer) that an overwrite must never remove.
    Raises ``ValueError`` (one line naming the directory and the fix) when ``out_dir`` is a file,
    is not empty without ``overwrite``, or holds something no preparation writes.
    """
    if is_remote(out_dir):
        if overwrite:
            raise ValueError(f"data prepare: --overwrite is not supported for the remote output "
                             f"{out_dir}; delete it with your storage tool or choose a new prefix")
        return
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"data prepare: output {out} is a file, not a directory; choose a new "
                         "directory for --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"data prepare: output directory {out} is not empty ({shown}); choose a "
                         "new directory or pass --overwrite to replace the data prepared there")
    resolved = out.resolve()
    for path in keep:
        if path and Path(path).resolve().is_relative_to(resolved):
            raise ValueError(f"data prepare: --overwrite would remove {path}, an input of this "
                             f"preparation inside the output directory {out}; move it out first "
                             "or choose a new directory")
    foreign = _foreign_entry(out)
    if foreign is not None:
        raise ValueError(f"data prepare: --overwrite removes only prepared data, but {out} also "
                         f"holds {foreign}; choose a new directory or remove it yourself")
    for entry in out.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            os.unlink(entry)
