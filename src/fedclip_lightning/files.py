"""Files that are whole or absent: write to a temporary name, flush, then rename.

Checkpoints, the feature cache, summaries and pretrained weights all go through these two functions, so a
crash (or a full disk) never leaves half a file where a reader would trust it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Write, then rename: a reader (or a crash of this process) sees the old file or the new one, never half.

    ``durable`` also flushes it to the disk (fsync) before the rename, so it survives the machine going
    down; files rewritten every round skip that (a millisecond each) and are made durable at the end.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)  # the file a person can act on, not a descriptor
        raise
    finally:
        tmp.unlink(missing_ok=True)  # never left behind (a full disk, say)


def atomic_save(obj: Any, path: Path, durable: bool = True) -> None:
    """``torch.save`` with ``atomic_write_text``'s guarantees (write, fsync when ``durable``, rename).

    The temporary name is unique per host, process and call (nodes of a cluster may share a folder, and a
    background checkpoint writer may run beside the round loop), and it never outlives a failed write.
    torch.save writes through a file object, so the zip's inner folder is ``archive`` whatever the names:
    the same object gives the same bytes (a path would name that folder after the temporary file).
    """
    import secrets
    import socket

    import torch

    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as exc:  # torch.save's zip writer reports a full disk as an "enforce fail"
        import errno
        import shutil

        if shutil.disk_usage(path.parent).free < (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
