"""The command blocks of the repository's Markdown documents, read as the tests run them (tests/readme/).

A fenced ``bash`` or ``python`` block is run as written. A one-line HTML comment right above the fence (invisible on
GitHub) says when a block is run another way:

* ``<!-- readme-test: first -->``: the README's first command; run verbatim on a fresh copy of the tree;
* ``<!-- readme-test: background: URL -->``: a server; started in the background, ready when ``URL`` answers 200,
  stopped after the document's last block;
* ``<!-- readme-test: cluster -->``: cluster commands; the cluster suite runs exactly these (tests/cluster/commands.py);
* ``<!-- readme-test: skip: REASON -->``: not run here, for the reason given (a Kubernetes cluster, a cloud account).

Blocks of one document run in order, in one folder, each in a fresh shell whose ``PATH`` starts with the project's
``.venv/bin`` (what ``source .venv/bin/activate`` gives the reader).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(
    r"(?:^<!-- readme-test: (?P<note>[^\n]*?) -->\n)?^```(?P<lang>bash|python)\n(?P<body>.*?)^```", re.M | re.S
)
KINDS = ("run", "first", "background", "cluster", "skip")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    index: int  # 0-based among the document's bash/python blocks
    lang: str
    body: str
    kind: str  # one of KINDS
    arg: str  # the URL of a background block, the reason of a skipped one

    @property
    def id(self) -> str:
        return f"{self.doc}#{self.index}"


def read_blocks(root: Path, doc: str) -> list[Block]:
    """Every bash/python block of ``doc`` with how it is run; an unknown note is an error (a typo would skip it)."""
    out = []
    for i, m in enumerate(FENCE.finditer((root / doc).read_text())):
        note = (m.group("note") or "run").strip()
        kind, _, arg = note.partition(":")
        kind, arg = kind.strip(), arg.strip()
        if kind not in KINDS:
            raise ValueError(f"{doc} block {i}: unknown readme-test note {note!r}")
        if kind in ("skip", "background") and not arg:
            raise ValueError(f"{doc} block {i}: `{kind}` needs {'a reason' if kind == 'skip' else 'a URL'}")
        out.append(Block(doc, i, m.group("lang"), m.group("body"), kind, arg))
    return out
