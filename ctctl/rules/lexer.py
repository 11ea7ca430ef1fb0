"""Split a tc command line into tokens that remember their column, and
resolve abbreviated keywords as iproute2 does."""

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


# A keyword table: (keyword, exact) in the order iproute2 tests them.
Keywords = tuple[tuple[str, bool], ...]


def keywords(spec: str) -> Keywords:
    """"dev= block root= ..." -> a table; "=" marks a keyword tc compares
    exactly (strcmp), the others take any prefix (matches())."""
    return tuple((w.rstrip("="), w.endswith("=")) for w in spec.split())


def resolve(word: str, table: Keywords) -> str | None:
    """The keyword tc would take `word` for, or None.

    iproute2's matches(word, keyword) accepts any non-empty prefix of the
    keyword, and the parsers test keywords one after the other, so an
    ambiguous prefix means the first keyword in the parser's order (`p` is
    `preference`, `c` is ct's `clear`).  Some keywords are compared exactly
    (strcmp): `dev`, `handle`, `ingress` in tc filter, `cookie`, ...
    """
    if not word:
        return None
    for kw, exact in table:
        if word == kw or (not exact and kw.startswith(word)):
            return kw
    return None
