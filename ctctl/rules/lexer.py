"""Split a tc command line into tokens that remember their column."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    text: str
    column: int  # 1-based, in characters of the input line

    def sub(self, start: int, end: int | None = None) -> "Token":
        """A slice of this token that still knows where it stands."""
        return Token(self.text[start:end], self.column + start)


def tokenize(line: str) -> list[Token]:
    """Whitespace-separated words, as a shell would split an unquoted line.

    Quotes are not interpreted: tc arguments never need them, and a quote in a
    rule is more likely a copy-and-paste accident that the parser should name.
    """
    tokens: list[Token] = []
    i, n = 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        start = i
        while i < n and not line[i].isspace():
            i += 1
        tokens.append(Token(line[start:i], start + 1))
    return tokens
