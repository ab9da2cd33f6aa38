"""Errors that the CLI turns into one clear line and a non-zero exit status.

Every failure a user can cause (a typo, a bad file, a diverging loss) raises a
``BenchError`` whose message names the problem and the fix; the CLI prints it
without a traceback.
"""


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
