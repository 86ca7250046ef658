"""The C++ argument checks format numbers and shapes with lk_num / lk_shape (std::to_string), never
by streaming them: on the H200 every check that streamed an integer segfaulted instead of raising
(csrc/common.cuh says more). This reads every TORCH_CHECK message in csrc/ and fails on any other
kind of argument, so a new check cannot bring the crash back."""

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"

ALLOWED = [
    re.compile(r'^((#\w+|"([^"\\]|\\.)*")\s*)+$'),  # string literals, #t stringification
    re.compile(r"^lk_(num|shape)\(.*\)$", re.S),  # formatted with std::to_string
    re.compile(r"^(name|NAME|weight_shape)$"),  # const char* names
    re.compile(r"^(DTYPE|dtype|\(?\w+\)?\.scalar_type\(\))$"),  # ScalarType prints as a name
]


def split_top_level(text: str) -> list[str]:
    """Split a call's argument list on commas outside brackets and string literals."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i += 1
            while text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    parts.append(text[start:].strip())
    return parts


def torch_checks(source: str) -> list[list[str]]:
    """The argument lists of every TORCH_CHECK(...) in a file (macro line continuations joined)."""
    source = source.replace("\\\n", " ")
    calls = []
    for match in re.finditer(r"\bTORCH_CHECK\(", source):
        depth, i = 1, match.end()
        while depth:
            if source[i] == '"':
                i += 1
                while source[i] != '"':
                    i += 2 if source[i] == "\\" else 1
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        calls.append(split_top_level(source[match.end() : i - 1]))
    return calls


def streamed_arguments(source: str) -> list[str]:
    return [
        arg
        for args in torch_checks(source)
        for arg in args[1:]  # args[0] is the condition
        if not any(pattern.match(arg) for pattern in ALLOWED)
    ]


@pytest.mark.parametrize("path", sorted(CSRC.glob("*.c*")), ids=lambda p: p.name)
def test_check_messages_stream_no_numbers(path):
    assert streamed_arguments(path.read_text()) == []


def test_the_scan_finds_streamed_numbers():
    source = r"""
    TORCH_CHECK(x.dim() == 2, "x must be 2-D, got ", x.sizes());
    TORCH_CHECK(rot <= head_dim, "rot must be in (0, ", head_dim, "], got ", lk_num(rot));
    TORCH_CHECK(ok(a, b), name, " must have dtype ", dtype, ", got ", t.scalar_type());
    #define CHECK(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
    TORCH_CHECK(t.dim() == 1, "shape [", lk_num(n), "], got ", lk_shape(t), " (a, \"b\")");
    """
    assert streamed_arguments(source) == ["x.sizes()", "head_dim"]
    assert len(torch_checks(source)) == 5
