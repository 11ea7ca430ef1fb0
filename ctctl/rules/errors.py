"""The one error type of the rules package.

A rule that cannot be accepted, for a syntax reason or because the kernel
would refuse it, raises RuleSyntaxError.  When the rule came from text the
error carries the 1-based column of the offending token, so that a user who
pasted a long tc line sees where it went wrong.
"""

from __future__ import annotations


class RuleSyntaxError(ValueError):
    def __init__(self, message: str, column: int | None = None, token: str | None = None):
        self.message = message
        self.column = column
        self.token = token
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.column is None:
            return self.message
        return f"{self.message} at column {self.column}"

    def shifted(self, prefix: str, column_offset: int = 0) -> "RuleSyntaxError":
        """The same error seen from a larger text (a YAML file, a CLI line)."""
        col = None if self.column is None else self.column + column_offset
        return RuleSyntaxError(f"{prefix}{self.message}", col, self.token)
