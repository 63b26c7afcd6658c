"""The second embedded corpus: Python source, as a population of people who write code.

The source is `sympy` at the version pinned in pyproject (`PINNED`): a pure-Python
package with 800+ modules, installed with torch anyway, identical on every machine that
installs the project. A module (one .py file outside tests/ and benchmarks/) is a client;
a record is one top-level function or class, with its decorators and docstring, exactly as
written (nested classes and methods stay inside their record). Modules are walked in path
order and records in file order, so the held-out records are a module's last definitions.

The built-in base never sees any of it: it is trained on the public plays only, like a
public model meeting a person's private data (its byte-level tokenizer still encodes code).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
from functools import lru_cache
from pathlib import Path

from fedllm.errors import DataError

PACKAGE, PINNED = "sympy", "1.14.0"
SKIPPED_DIRS = frozenset({"tests", "benchmarks"})  # test code is another population; not what the package is
CODE = "code"  # ClientData.kind of a code client (the plays' clients are "verse")


def code_root() -> Path:
    """Where the pinned package's source is; refused when another version is installed."""
    try:
        version = md.version(PACKAGE)
    except md.PackageNotFoundError:
        raise DataError(f"data.corpus=code needs the {PACKAGE} package: pip install {PACKAGE}=={PINNED}") from None
    if version != PINNED:
        raise DataError(f"data.corpus=code reads {PACKAGE}=={PINNED} (its records are pinned); {version} is installed: "
                        f"pip install {PACKAGE}=={PINNED}")
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the {PACKAGE} package has no source folder")
    return Path(list(spec.submodule_search_locations)[0])


def decode_source(raw: bytes, where: str) -> str:
    """UTF-8 source text; anything else is refused with its file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{where}:{line}: not UTF-8 ({exc.reason} at byte {exc.start}); "
                        "re-encode the file as UTF-8 or leave it out") from None


def records_of(text: str, where: str = "<source>") -> list[str]:
    """One record per top-level function or class: its source from the first decorator to
    the end of its body (docstring, methods and nested classes included)."""
    try:
        tree = ast.parse(text, filename=where)
    except SyntaxError as exc:
        raise DataError(f"{where}:{exc.lineno}: not valid Python ({exc.msg})") from None
    lines = text.splitlines()
    records = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            body = "\n".join(line.rstrip() for line in lines[start - 1: node.end_lineno]).strip()
            if body:
                records.append(body)
    return records


def module_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if SKIPPED_DIRS.isdisjoint(p.relative_to(root).parts))


def client_id_of(root: Path, path: Path) -> str:
    """`sympy/core/expr.py` -> `sympy.core.expr`."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=2)
def load_modules(root: Path | None = None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(client id, records) of every module under `root` (default: the pinned package)."""
    root = root or code_root()
    modules = []
    for path in module_files(root):
        where = str(path.relative_to(root.parent))
        modules.append((client_id_of(root, path), tuple(records_of(decode_source(path.read_bytes(), where), where))))
    return tuple(modules)
