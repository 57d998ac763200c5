"""containerd's filter syntax (`filters/parser.go`), enough for snapshot List/Walk.

    selectors := selector ("," selector)*        all must match
    selector  := fieldpath [operator value]      no operator: the field must be present
    fieldpath := field ("." field)*              field: [A-Za-z0-9_]+ or a quoted string
    operator  := "==" | "!=" | "~="              "~=" is a regular expression search
    value     := quoted | [^\\s,]+
    quoted    := "go string" | /regex/ | |regex|

Several filter strings match when any of them does (`ParseAll`). containerd's metadata layer asks
`labels."containerd.io/snapshot.ref"==<chainID>,parent=="<parent>"` after a remote Prepare.
A malformed filter is InvalidArgument, as in containerd.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import InvalidArgument

# (fieldpath) -> (value, present)
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_FIELD = re.compile(r"[A-Za-z0-9_]+")
_QUOTES = '"/|'
_OPERATORS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str = ""  # "" = presence
    value: str = ""

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        try:
            return re.search(self.value, value) is not None
        except re.error:
            return False


Filter = tuple[Selector, ...]  # all must match


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {what} at offset {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self) -> str:
        quote = self.text[self.pos]
        end = self.pos + 1
        while end < len(self.text) and self.text[end] != quote:
            if self.text[end] == "\n":
                break
            end += 2 if self.text[end] == "\\" else 1
        if end >= len(self.text) or self.text[end] != quote:
            raise self.fail("quoted literal not terminated")
        body = self.text[self.pos + 1:end]
        self.pos = end + 1
        if quote != '"':  # /regex/ and |regex|: only the quote itself is escaped
            return body.replace("\\" + quote, quote)
        try:
            out = json.loads('"' + body + '"')
        except ValueError:
            raise self.fail("bad escape in quoted literal") from None
        assert isinstance(out, str)
        return out

    def field(self) -> str:
        self.skip_space()
        ch = self.peek()
        if ch and ch in _QUOTES:
            return self.quoted()
        m = _FIELD.match(self.text, self.pos)
        if m is None:
            raise self.fail("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_space()
        ch = self.peek()
        if ch and ch in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a value")
        return self.text[start:self.pos]

    def selector(self) -> Selector:
        path = [self.field()]
        while True:
            self.skip_space()
            if self.peek() != ".":
                break
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        op = self.text[self.pos:self.pos + 2]
        if op in _OPERATORS:
            self.pos += 2
            return Selector(tuple(path), op, self.value())
        if self.peek() and self.peek() != ",":
            raise self.fail("expected an operator (==, !=, ~=) or ','")
        return Selector(tuple(path))

    def parse(self) -> Filter:
        out = [self.selector()]
        while True:
            self.skip_space()
            if not self.peek():
                return tuple(out)
            if self.peek() != ",":
                raise self.fail("expected ','")
            self.pos += 1
            out.append(self.selector())


def parse(text: str) -> Filter:
    """One filter string (selectors joined by ','); an empty string matches everything."""
    if text == "":
        return ()
    return _Parser(text).parse()


def parse_all(texts: Sequence[str]) -> list[Filter]:
    """Filters that match when any one does; an empty list matches everything."""
    return [parse(t) for t in texts]


def matches(filters: Sequence[Filter], adaptor: Adaptor) -> bool:
    if not filters:
        return True
    return any(all(sel.match(adaptor) for sel in f) for f in filters)
