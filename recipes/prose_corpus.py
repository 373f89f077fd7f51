"""English prose for encoder pre-training from text that Debian ships, as plain paragraphs.

    python recipes/prose_corpus.py OUT.txt [SOURCE ...]

A SOURCE is a fortune file (Debian's `fortunes`: `%` lines end a fortune) or a reStructuredText
file or folder (Debian's `python3.11-doc`: /usr/share/doc/python3.11/html/_sources, 12 MB of
Python's documentation). From reStructuredText only the running prose is kept: code blocks,
directives, tables, headings and their underlines go, and inline roles (:func:`len`) and markup
(``x``, *x*) become their text. Paragraphs come out separated by blank lines, which is how
`chatforge pretrain` separates documents. Without SOURCEs the Debian locations above are used.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

DEFAULT_SOURCES = ["/usr/share/games/fortunes", "/usr/share/doc/python3.11/html/_sources"]
SKIP_FORTUNES = {"chinese", "art", "ascii-art"}  # not English prose

ROLE = re.compile(r":[\w:.-]+:`(?:[^`<]*<)?~?!?([^`>]*)>?`")  # :func:`len` / :ref:`text <target>` -> text
LITERAL = re.compile(r"``([^`]*)``")
LINK = re.compile(r"`([^`<]+?)\s*(?:<[^>]*>)?`_{1,2}")
EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def rst_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one reStructuredText file, inline markup resolved."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = block.splitlines()
        if not lines or lines[0].startswith((" ", "\t", "..", ":", "|", "+", "=", ">>>", "*", "-", "#")):
            continue  # indented (code, directive bodies), directives, fields, tables, lists
        if any(UNDERLINE.match(line) for line in lines):
            continue  # headings
        para = " ".join(line.strip() for line in lines)
        para = ROLE.sub(r"\1", para)
        para = LITERAL.sub(r"\1", para)
        para = LINK.sub(r"\1", para)
        para = EMPHASIS.sub(r"\1", para).replace("::", ":")
        words = para.split()
        if len(words) >= 8 and sum(w.isalpha() for w in words) >= 0.6 * len(words):  # prose, not a listing
            out.append(" ".join(words))
    return out


def fortune_paragraphs(text: str) -> list[str]:
    """Each fortune as one paragraph (their line breaks are layout, not structure)."""
    return [" ".join(f.split()) for f in re.split(r"^%\s*$", text, flags=re.M) if f.strip()]


def paragraphs(source: Path) -> list[str]:
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    out: list[str] = []
    for f in files:
        if f.suffix == ".dat" or f.name in SKIP_FORTUNES or f.name.endswith("-o") or f.is_symlink():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        out += rst_paragraphs(text) if f.name.endswith(".rst.txt") or f.suffix == ".rst" else fortune_paragraphs(text)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1].strip())
        return 2
    sources = [Path(s) for s in (argv[1:] or DEFAULT_SOURCES)]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        print(f"prose_corpus: {', '.join(missing)} not found; install Debian's fortunes and python3.11-doc "
              "(apt-get install fortunes python3-doc) or name other sources", file=sys.stderr)
        return 1
    paras = [p for s in sources for p in paragraphs(s)]
    Path(argv[0]).write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    print(f"{len(paras)} paragraphs, {sum(map(len, paras)) / 1e6:.1f} MB of text -> {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
