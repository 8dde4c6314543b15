"""How a logical token axis is partitioned over the ranks of a Ulysses group (pure Python, static).

An :class:`Axis` describes one token dimension of a tensor under context parallelism: its logical
length L (the length a single process sees) and, for every rank, the ordered list of *pieces*
(``(start, length)`` ranges of the logical axis) that the rank holds locally, one after the other.

Invariant (checked by :meth:`Axis.check`): the pieces of all ranks partition ``[0, L)``; every
logical token lives on exactly one rank. So an all-to-all that concatenates every rank's local
tokens yields each logical token once (in the order :meth:`Axis.gathered_order` gives), which is
all attention needs: it is invariant to a common permutation of its keys and values and
equivariant in its queries.

- :meth:`Axis.even`: the first ``L mod W`` ranks hold one token more (reference/algorithms.md §6).
- :meth:`Axis.cat`: concatenation along the axis (joint attention: ``cat([text, image])``); rank r
  holds its text piece followed by its image piece.
- :meth:`Axis.slice`: ``x[a:b]`` along the axis, when each rank's surviving tokens are one
  contiguous local range (true for the slices that undo a ``cat``).

Everything here is static: the sizes follow from L and W, and every rank computes every rank's
pieces, so split sizes of collectives are known at compile time.
"""

from __future__ import annotations

import dataclasses

Piece = tuple[int, int]  # (logical start, length)


def even_sizes(length: int, world: int) -> list[int]:
    """Tokens per rank; the first ``length % world`` ranks get one more (algorithms.md §6)."""
    q, rem = divmod(length, world)
    return [q + 1 if r < rem else q for r in range(world)]


@dataclasses.dataclass(frozen=True)
class Axis:
    length: int
    pieces: tuple[tuple[Piece, ...], ...]  # per rank, in local order

    @property
    def world(self) -> int:
        return len(self.pieces)

    @staticmethod
    def even(length: int, world: int) -> "Axis":
        out, start = [], 0
        for n in even_sizes(length, world):
            out.append(((start, n),) if n else ())
            start += n
        return Axis(length, tuple(out)).check()

    def local_len(self, rank: int) -> int:
        return sum(n for _, n in self.pieces[rank])

    def local_lens(self) -> list[int]:
        return [self.local_len(r) for r in range(self.world)]

    def cat(self, other: "Axis") -> "Axis":
        assert self.world == other.world
        shifted = tuple(tuple((s + self.length, n) for s, n in p) for p in other.pieces)
        return Axis(self.length + other.length,
                    tuple(_merge(a + b) for a, b in zip(self.pieces, shifted))).check()

    def slice(self, start: int, stop: int) -> tuple["Axis", list[tuple[int, int]]] | None:
        """``x[start:stop]`` along the axis: the new axis and each rank's local ``(lo, hi)``.

        None when some rank's surviving tokens are not one contiguous local range.
        """
        start, stop = _clamp(start or 0, self.length), _clamp(stop, self.length)
        stop = max(stop, start)
        new_pieces, bounds = [], []
        for rank_pieces in self.pieces:
            kept, lo, hi, offset = [], None, None, 0
            for s, n in rank_pieces:
                a, b = max(s, start), min(s + n, stop)
                if a < b:
                    l0, l1 = offset + a - s, offset + b - s
                    if hi is not None and l0 != hi:
                        return None
                    lo = l0 if lo is None else lo
                    hi = l1
                    kept.append((a - start, b - a))
                offset += n
            new_pieces.append(_merge(tuple(kept)))
            bounds.append((lo, hi) if lo is not None else (0, 0))
        return Axis(stop - start, tuple(new_pieces)).check(), bounds

    def gathered_order(self) -> tuple[Piece, ...]:
        """Logical pieces in the order of the sequence an all-to-all assembles (rank 0's first)."""
        return _merge(tuple(p for rank_pieces in self.pieces for p in rank_pieces))

    def is_natural_order(self) -> bool:
        return self.gathered_order() in (((0, self.length),), ())

    def gather_ranges(self, block: int | None = None) -> tuple[Piece, ...]:
        """Ranges, in logical order, of a buffer holding every rank's local tokens in blocks of
        ``block`` (rank r's tokens start at ``r * block``): what reorders an all-gather. With no
        ``block`` the ranks' tokens follow each other: an all-to-all's gathered sequence."""
        located, offset = [], 0
        for r, rank_pieces in enumerate(self.pieces):
            offset = r * block if block is not None else offset
            for s, n in rank_pieces:
                located.append((s, offset, n))
                offset += n
        located.sort()
        return _merge(tuple((o, n) for _, o, n in located))

    def check(self) -> "Axis":
        covered = sorted(p for rank_pieces in self.pieces for p in rank_pieces if p[1] > 0)
        pos = 0
        for s, n in covered:
            assert s == pos, f"pieces of {self} do not partition [0, {self.length})"
            pos += n
        assert pos == self.length, f"pieces of {self} do not cover [0, {self.length})"
        return self


def _clamp(i: int | None, length: int) -> int:
    if i is None:
        return length
    if i < 0:
        i += length
    return min(max(i, 0), length)


def _merge(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
    """Drop empty pieces and join adjacent ones (``(0, 3), (3, 2)`` -> ``(0, 5)``)."""
    out: list[Piece] = []
    for s, n in pieces:
        if n == 0:
            continue
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return tuple(out)
