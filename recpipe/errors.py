"""User-facing errors. The CLI prints `error: <message>` on one line and exits with `exit_code`."""

from __future__ import annotations


class RecpipeError(Exception):
    """An error caused by input, configuration or environment; never a bug. Shown as one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the cause text holds


class DataError(RecpipeError):
    """A dataset file is missing, malformed or inconsistent."""


class ConfigError(RecpipeError):
    """recpipe.toml or a CLI override is wrong."""


class ArtifactError(RecpipeError):
    """A stage's inputs are missing, corrupt or were made by an incompatible upstream configuration."""


class BackendError(RecpipeError):
    """An external service or model (LLM, TEM endpoint, FAISS) failed in a way retries cannot fix."""


class Stopped(BaseException):
    """Ctrl-C or SIGTERM as the CLI raises it: like KeyboardInterrupt a BaseException, which no `except
    Exception` swallows, but one that click does not turn into "Aborted!" with exit code 1."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's code for a process ended by that signal: 130, 143
