"""Errors that the CLI turns into one clear line and a non-zero exit status.

Every failure a user can cause (a typo, a bad file, a diverging loss) raises a
``BenchError`` whose message names the problem and the fix; the CLI prints it
without a traceback.
"""

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path


class BenchError(Exception):
    """A user-facing failure: ``str(err)`` is the one line the CLI prints."""

    exit_code = 1


class UsageError(BenchError):
    """Bad command line: unknown name, malformed override, unknown key."""

    exit_code = 2


class DataError(BenchError):
    """Missing or malformed input data (prompt files, reference folders)."""

    exit_code = 3


class TrainingError(BenchError):
    """Training could not continue (non-finite loss); checkpoints are kept."""

    exit_code = 4


class WeightsMissingError(BenchError):
    """Weights are not on disk and the hub cannot be reached."""

    exit_code = 5


class StorageError(BenchError):
    """A write failed for want of space or permission (a full disk, a read-only cache)."""

    exit_code = 6


FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextmanager
def writing(folder):
    """Turn a write under ``folder`` that fails for want of space or permission into one StorageError
    line naming the folder (its nearest existing ancestor: the one that refused) and the fix. Other
    errors pass through; safetensors reports the OS error only in its message, "(os error 28)"."""
    try:
        yield
    except Exception as err:
        reported = re.search(r"\(os error (\d+)\)", str(err))
        code = err.errno if isinstance(err, OSError) else int(reported.group(1)) if reported else None
        if code not in FULL + DENIED:
            raise
        where = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())
        if code in FULL:
            raise StorageError(
                f"no space left in {where} ({os.strerror(code)}): free space on its disk, or set cache_dir=DIR (out=DIR for run folders) "
                "to a disk with room; a re-run keeps the finished work"
            ) from None
        raise StorageError(f"cannot write in {where} ({os.strerror(code)}): make it writable, or set cache_dir=DIR (out=DIR for run folders) to a writable folder") from None
