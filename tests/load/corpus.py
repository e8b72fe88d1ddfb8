"""A real text corpus that every machine has: the docstrings of Python's standard library.

Read with `ast`, never imported, so nothing in the stdlib runs. Docstrings are
split into paragraphs; when more passages are wanted than exist (about 12,500
here), each round repeats them with a variation: another passage's first four
words appended, as the search benchmark's issue allows.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def _docstrings(path: Path, module: str) -> Iterator[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return
    nodes: list[tuple[str, ast.AST]] = [(module, tree)]
    while nodes:
        prefix, node = nodes.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield prefix, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                nodes.append((f"{prefix}.{child.name}", child))


def _clip(text: str, max_chars: int) -> str:
    """At most `max_chars`, cut at a word boundary."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0]


def passages(minimum: int, max_chars: int = 600) -> list[str]:
    """At least `minimum` distinct passages, deterministic for a given Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    base: list[tuple[str, str]] = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if "test" in parts or "tests" in parts or "site-packages" in parts or "idle_test" in parts:
            continue
        for name, doc in _docstrings(path, ".".join(parts)):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text) >= 40:
                    base.append((name, _clip(text, max_chars)))
    unique = list({text: (name, text) for name, text in reversed(base)}.values())[::-1]
    result = [text for _, text in unique]
    count = len(unique)
    round_number = 0
    while len(result) < minimum:
        # A variation: each passage followed by the first sentence of another,
        # chosen by a stride, so the added passages stay distinct and natural.
        round_number += 1
        for i, (_, text) in enumerate(unique):
            other = unique[(i * 7919 + round_number * 104_729) % count][1]
            result.append(f"{text} {' '.join(other.split()[:4])}")
    return result[: max(minimum, count)]
