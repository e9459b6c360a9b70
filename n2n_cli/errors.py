"""Narrow exception types of the n2n library.

The library raises these; only the CLI turns them into exit codes and messages
(see ``n2n_cli.cli``). Every user error says *what* is wrong, *where* (file, field
or tensor key) and, where it can, *how to fix it*.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_VERIFICATION_FAILED = 3


class N2NError(Exception):
    """Base class of every error n2n reports to a user."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None,
                 problems: list[str] | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        self.problems = list(problems or [])
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        lines = [head]
        lines += [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class UserError(N2NError):
    """Bad input: usage, spec, model description, checkpoint, unsupported step (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class SpecError(UserError):
    """The growth spec (YAML) is malformed or invalid."""


class ModelError(UserError):
    """The model description is malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint cannot be read, is unsafe, or does not match the description."""


class StepError(UserError):
    """A growth step cannot be applied (unknown layer, not exact, unsupported)."""

    def __init__(self, message: str, *, short: str | None = None, flags: dict[str, str] | None = None, **kw):
        self.short = short or message  # a few words, for tables (``n2n inspect``)
        # spec wording -> command-line wording ("allow_approximate: true to the step" -> "--allow-approximate"),
        # applied by for_cli() when the step came from `n2n widen` / `n2n deepen` flags rather than a spec
        self.flags = dict(flags or {})
        super().__init__(message, **kw)

    def for_cli(self) -> "StepError":
        """Reword the message and hint in terms of the command-line flags the user typed."""
        for spec_form, flag in self.flags.items():
            self.message = self.message.replace(spec_form, flag)
            self.hint = self.hint.replace(spec_form, flag) if self.hint else self.hint
        self.flags = {}
        self.args = (self.render(),)
        return self


class OutputError(UserError):
    """The output path is unusable (exists, equals the input, not writable)."""


class VerificationFailed(N2NError):
    """The grown network does not compute the teacher's function (exit 3)."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, message: str, *, report: dict | None = None, **kw):
        self.report = report
        super().__init__(message, **kw)
