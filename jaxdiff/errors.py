"""The exceptions `jaxdiff` commands turn into one-line messages and documented exit codes."""

from __future__ import annotations

# Exit codes of the `jaxdiff` command (README, "Exit codes").
EXIT_USER_ERROR = 2  # bad input: a config, flag, path or checkpoint the user can fix
EXIT_NONFINITE = 3  # training stopped on a non-finite loss or gradient (train.nonfinite="stop")
EXIT_PREEMPTED = 75  # SIGTERM: a checkpoint was saved; rerun the same command to resume (EX_TEMPFAIL: requeue)


class UserError(ValueError):
    """Input the user can fix (a config key, a flag, a file): reported in one line, exit status 2."""


class Preempted(Exception):
    """A run stopped on SIGTERM after saving its checkpoint; rerunning the same command resumes it."""

    def __init__(self, step: int, workdir: str):
        super().__init__(f"preempted (SIGTERM) at step {step}: checkpoint saved in {workdir}; rerun to resume")
        self.step, self.workdir = step, workdir
