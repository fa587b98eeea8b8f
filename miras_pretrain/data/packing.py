"""Load-time packing of whole documents into rows of ``seq_len`` tokens (layout ``documents``).

Documents are laid end to end and cut at row boundaries; a document longer than the rest of a row
continues at the start of the next row. Within a row each document piece is one segment: the
memory state resets at every segment start (document start, continuation, row start).

Batch form: rows ``[B, T]``; ``cu_seqlens`` int32 ``[N + 1]`` holds the segment starts over the
*flattened* ``[1, B*T]`` sequence (row starts included) and ends with ``B*T`` -- the form the
model's op takes with ``B == 1``. Labels are the next token within the same document; a piece that
continues in the next row keeps its last label (the document's next token); a position whose
document ends there, and padding, get -100.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

IGNORE = -100


@dataclass
class DocItem:
    epoch: int
    pos: int  # position of this document in the epoch's global sample order
    tokens: np.ndarray  # 1-D, EOS included
    start: int = 0  # tokens already consumed before a resume


class DocPacker:
    """Fills rows from an iterator of ``DocItem``; tracks the resume position after each row."""

    def __init__(self, docs: Iterator[DocItem], seq_len: int, pad_id: int):
        self._docs = docs
        self.T = seq_len
        self.pad_id = pad_id
        self._cur: DocItem | None = None
        self._off = 0
        self.exhausted = False
        self.position: tuple[int, int, int] | None = None  # (epoch, sample_in_epoch, offset)

    def _next_doc(self) -> bool:
        try:
            self._cur = next(self._docs)
        except StopIteration:
            self._cur = None
            self.exhausted = True
            return False
        self._off = self._cur.start
        return True

    def row(self, materialize: bool = True):
        """Next row: ``(tokens [T] int64, labels [T] int64, seg_starts list[int])`` or ``None``
        when no document is left. A final partial row is padded (pad_id, labels -100, one
        padding segment). With ``materialize=False`` the row is consumed but not built
        (another data-parallel rank's row) and ``()`` is returned."""
        T = self.T
        tokens = np.full(T, self.pad_id, dtype=np.int64) if materialize else None
        labels = np.full(T, IGNORE, dtype=np.int64) if materialize else None
        starts: list[int] = []
        p = 0
        while p < T:
            if self._cur is None or self._off >= len(self._cur.tokens):
                if self.exhausted or not self._next_doc():
                    break
                if self._off >= len(self._cur.tokens):
                    continue
            doc = self._cur.tokens
            n = min(T - p, len(doc) - self._off)
            if materialize:
                piece = doc[self._off:self._off + n]
                tokens[p:p + n] = piece
                labels[p:p + n - 1] = piece[1:]
                if self._off + n < len(doc):
                    labels[p + n - 1] = doc[self._off + n]  # continues in the next row
                starts.append(p)
            self._off += n
            p += n
        if p == 0:
            return None
        if self._cur is not None:
            c = self._cur
            done = self._off >= len(c.tokens)
            self.position = (c.epoch, c.pos + 1, 0) if done else (c.epoch, c.pos, self._off)
        if not materialize:
            return ()
        if p < T:
            starts.append(p)  # padding segment
        return tokens, labels, starts


def flat_cu_seqlens(row_starts: list[list[int]], seq_len: int) -> np.ndarray:
    """Per-row segment starts -> int32 offsets over the flattened ``[1, B*T]`` batch."""
    out = [r * seq_len + s for r, starts in enumerate(row_starts) for s in starts]
    out.append(len(row_starts) * seq_len)
    return np.asarray(out, dtype=np.int32)
