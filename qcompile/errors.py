"""The one exception family of qcompile, by whose fault a failure is.

Every message says *what* went wrong, *where* (a path, a pass, a node, an input) and *what to do*.
Library code raises these; only the CLI turns them into one line and an exit code:

    2  the user's input or usage is wrong (QCompileError and most subclasses)
    1  a check the user asked for failed (CheckFailedError: a compare or gate threshold, --min-speedup)
    3  qcompile itself is wrong (InternalError: a pass crashed, or wrote an invalid, unrunnable or
       different model) — the pass is named, and the message says it is a qcompile bug
"""

from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose. Exit code 2 on the CLI."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        """The message as one line: what (where) — what to do."""
        text = self.what
        if self.where:
            text = f"{text} ({self.where})"
        if self.fix:
            text = f"{text} — {self.fix}"
        return " ".join(text.split())


class ModelLoadError(QCompileError):
    """The file is missing, empty, not ONNX, or cannot be parsed."""


class InvalidModelError(QCompileError):
    """The model parsed but is not a valid ONNX model (checker failure)."""


class ExternalDataError(QCompileError):
    """External data is missing, truncated, or points outside the model's folder."""


class OutputPathError(QCompileError):
    """The output path is not acceptable (it is the input, or cannot be written)."""


class InputSpecError(QCompileError):
    """A feed or input spec does not match the model's inputs."""


class UnknownNameError(QCompileError):
    """A pass, runtime or zoo entry name that does not exist."""


class RuntimeUnavailableError(QCompileError):
    """A runtime backend is not installed or has no device here."""


class DependencyError(QCompileError):
    """An optional dependency (an extra) is missing."""


class CheckFailedError(QCompileError):
    """A check the user asked for failed (a compare or gate threshold, --min-speedup). Exit code 1."""

    exit_code = 1


class BackendFailedError(QCompileError):
    """A runtime failed to load or run a model."""


class InputModelError(QCompileError):
    """The user's own model fails on the feeds it was given or that were chosen for it (checked on the
    original, before any pass runs)."""


class InternalError(QCompileError):
    """qcompile itself is wrong: a pass crashed, or produced a model that is invalid, does not run, or
    computes something else. Exit code 3; ``stage`` names the pass or phase."""

    exit_code = 3

    def __init__(self, what: str, *, stage: str | None = None, where: str | None = None,
                 fix: str | None = None) -> None:
        self.stage = stage
        super().__init__(what, where=where, fix=fix or "this is a qcompile bug: please report it with the model; "
                         "the input is untouched and nothing was written")


class VerificationError(InternalError):
    """A pass changed the model's semantics or broke its validity."""


class PassFailedError(InternalError):
    """A pass raised while transforming the model."""
