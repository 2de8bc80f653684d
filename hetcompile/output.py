"""Write an output directory atomically: a temporary sibling directory, renamed at the end."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hetcompile.errors import UserError


def write_atomically(out_dir: Path, files: dict[str, str | bytes], *, force: bool = False) -> Path:
    """Write ``files`` (name -> content) into ``out_dir``; an interrupted write leaves nothing behind."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"Output directory {str(out_dir)!r} already exists. Pass --force to replace it, "
                        "or choose another directory with -o.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name, content in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
