"""Strata's files are for Strata's user alone: the data dir 0700, every file in it 0600.

The data dir holds the SQLite database (with its -wal and -shm files), the encryption key file, the audit
checkpoints and the model servers' logs and runtime files. `strata serve` sets the umask to 077 so that
whatever it (or a model server it launches) creates there is private from the first byte, and tightens
what an older install left readable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_data_dir(data_dir: Path) -> None:
    """Create the data dir 0700, or take group and other permissions away from it and everything in it."""
    if not data_dir.exists():
        data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    tighten(data_dir, PRIVATE_DIR)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs:
            tighten(Path(root, name), PRIVATE_DIR)
        for name in files:
            tighten(Path(root, name), PRIVATE_FILE)


def tighten(path: Path, mode: int) -> None:
    """Take the permission bits beyond `mode` away from a file or folder this user owns; leave others alone
    (a symbolic link, or what another user owns: chmod would fail or reach outside)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid() or not stat.S_IMODE(info.st_mode) & ~mode:
        return
    os.chmod(path, stat.S_IMODE(info.st_mode) & mode)
