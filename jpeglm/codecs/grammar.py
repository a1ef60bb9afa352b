"""The grammar of a :class:`~jpeglm.codecs.JpegCodec`'s streams, as a byte automaton and over token ids.

Every stream :meth:`JpegCodec.encode <jpeglm.codecs.JpegCodec.encode>` writes has one fixed shape: exactly
``codec.header``, then the scan (``num_mcus`` MCUs of Huffman-coded blocks, byte-stuffed, a restart marker
FFD0..FFD7 after every ``restart_interval`` MCUs but the last), padding 1-bits and EOI (FFD9). :class:`JpegGrammar`
is a deterministic automaton that accepts exactly the prefixes of such streams (any coefficients, but only
well-formed ones), and :class:`TokenGrammar` turns it into masks over a tokenizer's ids for grammar-constrained
sampling: every stream sampled under the masks decodes complete.

State
    A :class:`State` is ``(local, mcus)``, both ints, valid at byte boundaries. ``mcus`` counts the MCUs
    finished so far. ``local`` packs the decoder state into one int (the same for every grammar of equal
    codecs, so states may move between instances; :meth:`JpegGrammar.unpack` gives the tuple):

    * ``(HEAD, p)``: the next byte is ``header[p]``;
    * ``(DATA, block, k, node, extra, stuff)``: inside an MCU, at block ``block`` of its block list, coefficient
      ``k`` (0 = DC), ``node`` = the Huffman code read so far (a node of the table's code tree, 0 = no bits yet),
      ``extra`` = magnitude bits still to read, ``stuff`` = the last byte was 0xFF, so a stuffed 0x00 comes next;
    * ``(MARK1, marker, stuff)``: an interval ended (and was padded); next (after a pending stuffed 0x00)
      comes 0xFF of the marker ``marker`` (0xD0 + i % 8, or 0xD9 = EOI after the last interval);
    * ``(MARK2, marker)``: the marker's second byte is next;
    * ``(DONE,)``: after EOI; nothing may follow.

    One byte moves ``local`` by a pure function of ``(local, ctx, byte)``, where ``ctx`` = ``(left, marker)``
    holds the MCUs left in the current restart interval (clipped to 9: one byte's 8 bits cannot finish more than
    8 MCUs) and the marker that will end the interval (0 when ``left`` is clipped). The byte gives the new
    ``local`` and how many MCUs it finished. Only a byte that finishes an MCU reads ``ctx``, so moves are
    memoized per ``(local, byte)`` and, for those bytes alone, per ``(local, ctx, byte)`` (see "Moves").

    Every accepted state can still be completed: a partial Huffman code is refused as soon as no code it starts
    is valid at the current coefficient (near coefficient 63 only short runs and EOB are), so masks never leave a
    sampler without an allowed id (given that every single byte is among the pieces, as in a CodecTokenizer).

Caching key
    A token of at most ``L`` bytes (``8 L`` bits) finishes at most ``D = 1 + (8 L - 1) // min_mcu_bits`` MCUs
    (the current MCU may finish after one bit, each further one needs at least ``min_mcu_bits``, the shortest DC
    plus shortest AC code of every block). Its walk from ``(local, mcus)`` therefore reads only ``local`` and the
    contexts ``ctx[mcus .. mcus + D]``, and so does its result ``(local', mcus' - mcus)``. :class:`TokenGrammar`
    interns that tuple of contexts to a small int per ``mcus`` and caches masks and token steps under
    ``(local, context id)``. Two states with equal keys hence allow exactly the same tokens and move by them to
    the same ``local`` with the same MCU gain: the cache is exact, not a heuristic. Far from an interval end every
    context is ``(9, 0)``, so one key serves the whole image; with a marker after every MCU the contexts repeat
    every 8 MCUs (the marker number), so the keys do too, until the image end comes within reach.

Budget
    A sampler with a fixed number of ids left (a context of 512 ids, say) asks ``allowed(state, budget)``, where
    ``budget`` counts the ids it may still draw, this one included: only ids after which the stream can still be
    finished (EOI written; the sampler stops there, eos is not counted) with ``budget - 1`` more ids. A walk that
    draws from these masks, one id less each step, therefore always finishes in time, even uniform sampling.

    *Finish cost.* :meth:`JpegGrammar.finish_stream` is the cheapest continuation of a state: the rest of the
    header; 0s for pending extra bits; at a Huffman code node, the bit towards the fewest bits left to end the block
    (0 on ties; so a cheapest code, EOB as soon as it is cheapest); each further block its cheapest (the shortest DC
    code with its extra bits, then EOB for the standard tables); 1-bits of padding, a stuffed 0x00 after every 0xFF
    and each interval's marker. It takes the fewest bits possible, so it is the shortest continuation up to the
    stuffed 0x00s it happens to need (none for the standard tables). :meth:`JpegGrammar.finish_bytes` is its
    length, :meth:`TokenGrammar.finish_cost` the same count in ids (one single-byte id per byte: an achievable
    upper bound; multi-byte tokens may do with fewer). The continuation is a function of the bit-level decoder
    state alone, so from ``s`` its first byte ``b`` leads to a state whose continuation is its tail:
    ``finish(step(s, b)) == finish(s) - 1``, and ``allowed(s, budget)`` is never empty while
    ``finish(s) <= budget``. Its length is ``(bytes through the current interval's marker, memoized per (local,
    MCUs left in the interval)) + (the cheapest later intervals, summed once per grammar)``; an interval from its
    first MCU takes ``ceil(n M / 8) + 2`` bytes (``M`` the cheapest MCU's bits) when nothing needs stuffing.
    For the standard tables at a marker after every MCU (4:2:0, ``M`` = 32 bits: 6 bytes an MCU) ``finish_cost``
    of ``start`` is 59 + 96 = 155 ids at 64x64, 59 + 1536 = 1595 at 256x256.

    *Masks.* ``allowed(s, budget)`` keeps the allowed ids ``t`` with ``finish(step(s, t)) <= budget - 1``. The
    rise ``finish(step(s, t)) - finish(s)`` of each allowed id is computed once per key (the key holds every MCU
    count it depends on when restart intervals are at most 8 MCUs; else per ``(key, mcus)``) and kept sorted, so a
    tight mask is one slice. The fast path needs none of it: no token raises the finish cost by more than
    ``fast_margin = 2 ceil(c_max / 8) + 2`` (``c_max`` bounds the bits of the cheapest end of any MCU from any
    state: ``ceil(c_max / 8)`` more data bytes, and as many stuffed 0x00s at most, plus one after the padding and
    one pending), so with ``budget - 1 >= finish(s) + fast_margin`` the plain cached mask is returned as it is.
    That bound holds when no 8 consecutive bits of the repeated cheapest MCU are 1s (true for the standard tables:
    their codes hold 0s); otherwise ``fast_margin`` is None and every budgeted call filters. Whether a budget is
    that ample is decided on an upper bound of ``finish(s)`` that takes no walk (``c_max`` bits to end the MCU,
    ``M`` for each further one of the interval, every data byte stuffed, or with that property only those of the
    current MCU and the padding), so a sampler far from its budget never computes a finish cost at all.

Moves
    Masks are built, and single ids checked, from memoized tables rather than by decoding bits in Python
    (:meth:`JpegGrammar._step_byte`, the reference decoder, now only explains refusals and serves the tests):

    * *bit pairs*: a DATA state without a pending stuffed byte is a bit state; ``_pairs[s]`` holds its two moves
      by one bit, a bit state, :data:`_NO` (refused) or :data:`_CTX` (the MCU ended: the context decides). One
      entry per (block, coefficient, code node or extra bits): some 60,000 for 4:2:0, built in bulk once per block
      layout (some 0.2 s) and shared by every grammar of it, as are the cheapest bits of the finish costs;
    * *nibble rows*: ``_nibbles[s]``, the 16 moves of a bit state by 4 bits, from its pairs;
    * *byte rows*: ``_rows[local]``, the 256 moves of a state, 16 nibble rows joined (DATA; a stuffed 0x00, a
      marker or header byte otherwise: one byte allowed); a trie node with many edges (the root) reads them in bulk;
    * *single moves*: ``_moves[local << 8 | byte]``, 8 bit pairs, for the few edges deeper in the token trie, for
      :meth:`JpegGrammar.advance` and so for :meth:`TokenGrammar.step`; and the ``_CTX`` moves, per
      ``(local, ctx, byte)``.

    :meth:`JpegGrammar.advance`, the trie walk of :meth:`TokenGrammar.allowed` and the cheapest continuation
    (finish costs) all read these tables, so a state never seen costs a walk of dict and list lookups (the mask of
    a 320-id tokenizer's DATA state: some 0.33 ms instead of 1.8 ms on this project's shared 2-core machine; a
    single id: some 9 µs instead of 20). Caches past a size limit start again (an untrained model meets a new
    state nearly every step), and :meth:`TokenGrammar.for_tokenizer` keeps its last few grammars.

    A sampler need not build masks at all: :meth:`TokenGrammar.allows` answers for one id, and
    :class:`~jpeglm.generation.GrammarConstraint` lets :func:`~jpeglm.generation.generate` draw from all ids and
    build the mask only for rows whose draws the grammar refuses (exact: see its ``_Sampler._draw_lazily``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where masks are made: `jpeglm prepare`'s workers import codecs without it
    import torch

from jpeglm.codecs.jpeg import JpegCodec

HEAD, DATA, MARK1, MARK2, DONE = range(5)
_EOI = 0xD9
_CLIP = 9  # ctx clips the MCUs left in an interval here: one byte (8 bits) finishes at most 8 MCUs
_UNSEEN = object()
_PAIRS: dict[str, dict[int, tuple[int, int]]] = {}  # the bit moves of each block layout (see "Moves")
_CHOICES: dict[str, dict[int, int]] = {}  # the cheapest bits of each block layout
_COSTS: dict[str, list[tuple[list[list[int]], list[int]]]] = {}  # the finish cost tables of each block layout
_GRAMMARS: dict[tuple[str, int, int, int], tuple[Any, TokenGrammar]] = {}  # TokenGrammar.for_tokenizer's, kept
_GRAMMARS_KEPT = 4
_NO, _CTX = -1, -2  # moves: refused; depends on the context (finishes an MCU). Other moves are states (ints >= 0)
_ROW_LIMIT = 1 << 14  # byte rows kept (2 KB each); past it that cache starts again (so do the others)
_MOVE_LIMIT = 1 << 19  # single byte moves kept


class _NeedsContext(Exception):
    """Raised by a context-free probe of a byte that finishes an MCU."""


_Tree = tuple[list[list[int | None]], list[tuple[int, int]], list[int]]  # (children, prefixes, limits): _code_tree
_WIDTHS = {HEAD: (20,), DATA: (4, 7, 9, 4, 1), MARK1: (8, 1), MARK2: (8,), DONE: ()}  # bits per field of a state
_SHIFTS = {phase: tuple(3 + sum(widths[:i]) for i in range(len(widths))) for phase, widths in _WIDTHS.items()}
_DATA_FIELDS = list(zip(_SHIFTS[DATA], _WIDTHS[DATA], strict=True))  # (shift, width) of block, k, node, extra, stuff
_STUFF = 1 << _SHIFTS[DATA][4]  # the ``stuff`` bit of a packed DATA state (the last byte was 0xFF)


class State(NamedTuple):
    """Where a :class:`JpegGrammar` stands between two bytes: the packed decoder state and the MCUs finished."""

    local: int
    mcus: int


class _Reject(Exception):
    """A byte that cannot continue the stream; the message says why."""


class JpegGrammar:
    """Byte-level automaton of the codec's streams.

    Accepts exactly the prefixes of streams shaped like :meth:`JpegCodec.encode`'s: the codec's header, every MCU
    of the image as well-formed Huffman-coded blocks (baseline rules: at most 63 AC coefficients, EOB, ZRL), 0xFF
    data bytes stuffed with 0x00, each restart interval padded with 1-bits and ended by the next restart marker,
    EOI after the last MCU and nothing after it. See the module docstring for the state.

    Args:
        codec: the codec whose header, Huffman tables, block layout and restart interval the streams use.

    Attributes:
        start: the state before any byte.
        min_mcu_bits: fewest bits any MCU can take (a lower bound: shortest DC plus shortest AC code per block).
    """

    def __init__(self, codec: JpegCodec) -> None:
        self.codec = codec
        self.header = codec.header
        layout = codec._layout
        trees: dict[int, _Tree] = {}
        for dc, ac in layout.blocks:
            for lut in (dc, ac):
                if id(lut) not in trees:
                    trees[id(lut)] = _code_tree(lut)
        self._trees = [(trees[id(dc)], trees[id(ac)]) for dc, ac in layout.blocks]
        self.min_mcu_bits = sum(_shortest(dc[0]) + _shortest(ac[0]) for dc, ac in self._trees)
        self._ctx = [self._context(m) for m in range(codec.num_mcus + 1)]
        if len(self._trees) >= 1 << _WIDTHS[DATA][0] or max(len(t[0]) for b in self._trees for t in b) > 1 << 9:
            raise ValueError("more blocks per MCU or Huffman codes than baseline JPEG allows")
        self._unpacked: dict[int, tuple[int, ...]] = {}
        self._fingerprint = repr(self._trees)  # grammars of equal Huffman trees and blocks share their bit tables
        if self._fingerprint not in _PAIRS:
            _PAIRS[self._fingerprint] = _all_pairs(self._trees)
        self._pairs = _PAIRS[self._fingerprint]  # bit state -> its moves by bit 0 and by bit 1
        self._nibbles = {_NO: [_NO] * 16, _CTX: [_CTX] * 16}  # bit state -> its moves by 4 bits
        self._rows: dict[int, list[int]] = {}  # local -> its move by each byte (see "Moves")
        self._moves: dict[int, int] = {}  # local << 8 | byte -> the move (see "Moves")
        self._by_ctx: dict[tuple[int, tuple[int, int], int], tuple[int, int] | None] = {}
        self._scan = self._pack((DATA, 0, 0, 0, 0, 0))
        self._marks = {(m, ff): self._pack((MARK1, m, int(ff))) for m in [*range(0xD0, 0xD8), _EOI] for ff in (0, 1)}
        self.start = State(self._pack((HEAD, 0)), 0)
        self._finish: _Finisher | None = None

    def _context(self, mcus: int) -> tuple[int, int]:
        """``(left, marker)`` after ``mcus`` MCUs: MCUs left in the interval (clipped), the marker that ends it."""
        codec = self.codec
        interval = codec.restart_interval
        left = min(interval - mcus % interval, codec.num_mcus - mcus)
        if left >= _CLIP:
            return _CLIP, 0
        marker = _EOI if mcus + left == codec.num_mcus else 0xD0 + (mcus // interval) % 8
        return left, marker

    def _pack(self, local: tuple[int, ...]) -> int:
        """The int of a decoder state: the same for every grammar of a codec, so states move between instances."""
        value = local[0]
        for field, shift in zip(local[1:], _SHIFTS[local[0]], strict=False):
            value |= field << shift
        return value

    def unpack(self, state: State) -> tuple[int, ...]:
        """The decoder state of ``state`` as a tuple: ``(phase, *fields)`` (see the module docstring)."""
        return self._unpack(state.local)

    def _unpack(self, value: int) -> tuple[int, ...]:
        local = self._unpacked.get(value)
        if local is None:
            fields, rest = [value & 7], value >> 3
            for width in _WIDTHS[value & 7]:
                fields.append(rest & ((1 << width) - 1))
                rest >>= width
            local = self._unpacked[value] = tuple(fields)
        return local

    # ------------------------------------------------------------------ public

    def advance(self, state: State, data: bytes) -> State | None:
        """The state after ``data``, or None if ``data`` cannot continue a valid stream from ``state``.

        Args:
            state: a state of this grammar (:attr:`start` or one it returned).
            data: the bytes to append.
        """
        local, mcus = state
        moves, byte_move, ctx_move = self._moves, self._byte_move, self._ctx_move
        for byte in data:
            moved = moves.get(local << 8 | byte)
            if moved is None:
                moved = byte_move(local, byte)
            if moved == _NO:
                return None
            if moved == _CTX:
                moved = ctx_move(local, mcus, byte)
                if moved is None:
                    return None
                local, mcus = moved
            else:
                local = moved
        return State(local, mcus)

    def finished(self, state: State) -> bool:
        """True exactly after the EOI of a complete stream."""
        return self._unpack(state.local)[0] == DONE

    def check_prefix(self, stream: bytes) -> State:
        """The state after ``stream``, which must be a prefix of a valid stream (a prompt, say).

        Raises:
            ValueError: naming the offset of the first byte that cannot belong to a valid stream, the byte, and
                what the grammar expected there.
        """
        state = self.start
        for offset, byte in enumerate(bytes(stream)):
            moved = self.advance(state, bytes((byte,)))
            if moved is None:
                raise ValueError(
                    f"byte {offset} (0x{byte:02X}) cannot continue a valid {self.codec!r} stream: expected "
                    f"{self.expected(state, byte)}"
                )
            state = moved
        return state

    def finish_bytes(self, state: State) -> int:
        """Length of the cheapest continuation of ``state`` into a finished stream (0 when finished).

        The continuation (:meth:`finish_stream`) writes the fewest bits each block can take, so its length is the
        fewest bytes any continuation needs, up to the stuffed 0x00 bytes it happens to need (see "Budget" in the
        module docstring). Cached per ``(local, MCUs left in the interval)``: a dict lookup once seen.
        """
        return self._finisher().cost(state)

    def finish_stream(self, state: State) -> bytes:
        """The cheapest continuation of ``state`` into a finished stream: :meth:`finish_bytes` bytes."""
        finisher, out = self._finisher(), bytearray()
        while not self.finished(state):
            out.append(finisher.next_byte(state))
            moved = self.advance(state, out[-1:])
            if moved is None:
                raise AssertionError(f"the cheapest continuation was refused after {self.expected(state)}")
            state = moved
        return bytes(out)

    def _finisher(self) -> _Finisher:
        """The cost tables of :meth:`finish_bytes`, built on first use (some 10-50 ms)."""
        if self._finish is None:
            self._finish = _Finisher(self)
        return self._finish

    def expected(self, state: State, byte: int | None = None) -> str:
        """What may come after ``state``, in words; with ``byte``: also why that byte may not."""
        local = self._unpack(state.local)
        phase = local[0]
        if phase == HEAD:
            return f"header byte {local[1]} of {len(self.header)}, 0x{self.header[local[1]]:02X}"
        if phase == DONE:
            return "nothing: the stream ended with its EOI marker"
        if phase == MARK2:
            return f"0x{local[1]:02X}, the second byte of the {_marker_name(local[1])} marker"
        if local[-1]:
            return "0x00, the byte stuffed after a 0xFF of entropy-coded data"
        if phase == MARK1:
            return f"0xFF, the first byte of the {_marker_name(local[1])} marker after MCU {state.mcus - 1}"
        _, block, k, _, _, _ = local
        where = f"entropy-coded data of MCU {state.mcus}, block {block}, {'DC' if k == 0 else f'AC {k}'}"
        if byte is None:
            return where
        try:
            self._step_byte(state.local, self._ctx[state.mcus], byte, explain=True)
        except _Reject as e:
            return f"{where} ({e})"
        return where

    # ------------------------------------------------------------------ one byte

    def _step_byte(self, index: int, ctx: tuple[int, int] | None, byte: int, explain: bool = False) -> Any:
        """``(local, MCUs finished)`` after ``byte``, or None; with ``explain`` a bad byte raises :class:`_Reject`.

        The reference decoder, bit by bit: the move tables (see "Moves" in the module docstring) give the same.

        With ``ctx`` None, a probe: a byte that would finish an MCU gives ``_CTX`` (its move needs the context).
        """
        local = self._unpack(index)
        phase = local[0]
        try:
            if phase == HEAD:
                pos = local[1]
                if byte != self.header[pos]:
                    raise _Reject("header mismatch")
                return (self._pack((HEAD, pos + 1)) if pos + 1 < len(self.header) else self._scan), 0
            if phase == DONE:
                raise _Reject("nothing may follow EOI")
            if phase == MARK2:
                if byte != local[1]:
                    raise _Reject("wrong marker")
                return (self._pack((DONE,)) if byte == _EOI else self._scan), 0
            if local[-1]:  # the last byte was 0xFF: a stuffed 0x00 must follow
                if byte != 0:
                    raise _Reject("0xFF in entropy-coded data must be followed by 0x00")
                return self._pack(local[:-1] + (0,)), 0
            if phase == MARK1:
                if byte != 0xFF:
                    raise _Reject("a marker must follow")
                return self._pack((MARK2, local[1])), 0
            return self._bits(local, ctx, byte)
        except _NeedsContext:
            return _CTX
        except _Reject:
            if explain:
                raise
            return None

    def _bits(self, local: tuple[int, ...], ctx: tuple[int, int] | None, byte: int) -> tuple[int, int]:
        """Decode the 8 bits of one entropy-coded byte (MSB first) from a DATA state; raises :class:`_Reject`."""
        _, block, k, node, extra, _ = local
        trees = self._trees
        tree = trees[block][k != 0]
        children, limits = tree[0], tree[2]
        done = 0
        for shift in range(7, -1, -1):
            if extra:
                extra -= 1
                if extra or k < 64:
                    continue
            else:
                child = children[node][(byte >> shift) & 1]
                if child is not None and child > 0 and k <= limits[child]:
                    node = child  # inside a code
                    continue
                k, extra = _symbol(tree, node, k, (byte >> shift) & 1)
                node = 0
                tree = trees[block][1]
                children, limits = tree[0], tree[2]
                if extra or k < 64:
                    continue
            block, k = block + 1, 0  # the block ended (EOB, or coefficient 63 written)
            if block < len(trees):
                tree = trees[block][0]
                children, limits = tree[0], tree[2]
                continue
            if ctx is None:
                raise _NeedsContext
            block, done = 0, done + 1
            tree = trees[0][0]
            children, limits = tree[0], tree[2]
            if done == ctx[0]:  # the interval ended: the rest of the byte is padding
                pad = (1 << shift) - 1
                if byte & pad != pad:
                    raise _Reject("the padding after the last MCU of an interval must be 1-bits")
                return self._pack((MARK1, ctx[1], int(byte == 0xFF))), done
        return self._pack((DATA, block, k, node, extra, int(byte == 0xFF))), done

    # ------------------------------------------------------------------ moves (table-driven)

    def _row(self, local: int) -> list[int]:
        """The move of ``local`` by each byte (see "Moves" in the module docstring); kept."""
        if len(self._rows) >= _ROW_LIMIT:
            self._rows.clear()
        if local & 7 == DATA and not local & _STUFF:
            nibbles, row = self._nibbles, []
            for mid in nibbles.get(local) or self._nibble_row(local):  # after the high 4 bits: the low 4 bits' row
                row += nibbles.get(mid) or self._nibble_row(mid)
            if row[255] >= 0:
                row[255] |= _STUFF  # 0xFF: a stuffed 0x00 comes next
        else:
            row = [_NO] * 256
            byte = self._only_byte(local)
            if byte is not None:
                row[byte] = self._byte_move(local, byte)
        self._rows[local] = row
        return row

    def _only_byte(self, local: int) -> int | None:
        """The one byte that may follow ``local`` outside entropy-coded data bits (None after EOI)."""
        fields = self._unpack(local)
        phase = fields[0]
        if phase == HEAD:
            return self.header[fields[1]]
        if phase == MARK2:
            return fields[1]
        if phase == DONE:
            return None
        return 0 if fields[-1] else 0xFF  # a stuffed 0x00, or a marker's 0xFF

    def _byte_move(self, local: int, byte: int) -> int:
        """The move of ``local`` by ``byte`` (as in its :meth:`_row`), memoized per ``(local, byte)``."""
        if len(self._moves) >= _MOVE_LIMIT:
            self._moves.clear()
        key, pairs = local << 8 | byte, self._pairs
        if local & 7 != DATA or local & _STUFF:
            moved = self._step_byte(local, None, byte)
            self._moves[key] = _NO if moved is None else moved[0]
            return self._moves[key]
        for shift in (7, 6, 5, 4, 3, 2, 1, 0):
            local = (pairs.get(local) or self._pair(local))[(byte >> shift) & 1]
            if local < 0:
                break
        else:
            local = local | _STUFF if byte == 0xFF else local
        self._moves[key] = local
        return local

    def _ctx_move(self, local: int, mcus: int, byte: int) -> tuple[int, int] | None:
        """``(local, mcus)`` after a byte that finishes an MCU from DATA ``local`` (a :data:`_CTX` move), or None."""
        moved = self._ctx_byte(local, self._ctx[mcus], byte)
        return None if moved is None else (moved[0], mcus + moved[1])

    def _ctx_byte(self, local: int, ctx: tuple[int, int], byte: int) -> tuple[int, int] | None:
        """``(local, MCUs finished)`` after ``byte`` from DATA ``local`` (no stuffing pending) in context ``ctx``, or
        None; memoized per ``(local, ctx, byte)``."""
        key = (local, ctx, byte)
        moved = self._by_ctx.get(key, _UNSEEN)
        if moved is _UNSEEN:
            if len(self._by_ctx) >= _MOVE_LIMIT:
                self._by_ctx.clear()
            pairs, done = self._pairs, 0
            for shift in (7, 6, 5, 4, 3, 2, 1, 0):
                local = (pairs.get(local) or self._pair(local))[(byte >> shift) & 1]
                if local == _NO:
                    break
                if local == _CTX:  # the MCU ended
                    done, local = done + 1, self._scan
                    if done == ctx[0]:  # and the interval: the rest of the byte is padding, 1-bits
                        pad = (1 << shift) - 1
                        local = self._marks[ctx[1], byte == 0xFF] if byte & pad == pad else _NO
                        break
            else:
                local = local | _STUFF if byte == 0xFF else local
            moved = self._by_ctx[key] = None if local == _NO else (local, done)
        return moved  # type: ignore[return-value]

    def _nibble_row(self, bits: int) -> list[int]:
        """The moves of the bit state ``bits`` by each 4 bits (MSB first): bit states, :data:`_NO` or :data:`_CTX`."""
        pairs, level = self._pairs, [bits]
        for _ in range(4):
            level = [y for x in level for y in ((x, x) if x < 0 else pairs.get(x) or self._pair(x))]
        self._nibbles[bits] = level
        return level

    def _pair(self, bits: int) -> tuple[int, int]:
        """The moves of the bit state ``bits`` (a packed DATA state, no stuffing) by bit 0 and by bit 1: a bit state,
        :data:`_NO` (refused) or :data:`_CTX` (the MCU ended). The decoding of :meth:`_bits`, one bit at a time."""
        fields = [(bits >> shift) & ((1 << width) - 1) for shift, width in _DATA_FIELDS[:4]]
        pair = self._pairs[bits] = (self._bit(*fields, 0), self._bit(*fields, 1))
        return pair

    def _bit(self, block: int, k: int, node: int, extra: int, bit: int) -> int:
        tree = self._trees[block][k != 0]
        if extra:
            extra -= 1
        else:
            child = tree[0][node][bit]
            if child is None:
                return _NO
            if child > 0:
                return _data_state(block, k, child, 0) if k <= tree[2][child] else _NO  # inside a code
            k, extra = _after_symbol(~child, k)
            if k < 0:
                return _NO
            node = 0
        if extra or k < 64:
            return _data_state(block, k, node, extra)
        if block + 1 < len(self._trees):  # the block ended (EOB, or coefficient 63 written)
            return _data_state(block + 1, 0, 0, 0)
        return _CTX


def _after_symbol(symbol: int, k: int) -> tuple[int, int]:
    """``(k, extra)`` after a Huffman symbol read at coefficient ``k`` (as :func:`_symbol`); k = -1: refused."""
    if k == 0:
        return 1, symbol  # DC: `symbol` magnitude bits follow
    run, size = symbol >> 4, symbol & 15
    if size:
        return (-1, 0) if k + run > 63 else (k + run + 1, size)
    if run == 15:  # ZRL: 16 zeros
        return (-1, 0) if k + 16 > 64 else (k + 16, 0)
    return 64, 0  # EOB


def _all_pairs(trees: list[tuple[_Tree, _Tree]]) -> dict[int, tuple[int, int]]:
    """The moves by bit 0 and by bit 1 (:meth:`JpegGrammar._bit`) of every bit state, in bulk: some 60,000 for 4:2:0
    (a few blocks, 64 coefficients, the code tree's nodes or the extra bits left), built once per block layout."""
    pairs: dict[int, tuple[int, int]] = {}
    for block, (dc, ac) in enumerate(trees):
        ended = _data_state(block + 1, 0, 0, 0) if block + 1 < len(trees) else _CTX  # the block's end
        for k in range(1, 65):  # extra bits: either bit moves alike
            for extra in range(1, 16):
                moved = _data_state(block, k, 0, extra - 1) if extra > 1 or k < 64 else ended
                pairs[_data_state(block, k, 0, extra)] = (moved, moved)
        for tree, ks in ((dc, range(1)), (ac, range(1, 64))):
            children, _, limits = tree
            for node, kids in enumerate(children):
                zero, one = (_kid_moves(block, ks, kid, limits, ended) for kid in kids)
                for k, pair in zip(ks, zip(zero, one, strict=True), strict=True):
                    if not node or k <= limits[node]:
                        pairs[_data_state(block, k, node, 0)] = pair
    return pairs


def _kid_moves(block: int, ks: range, kid: int | None, limits: list[int], ended: int) -> list[int]:
    """The move by the bit that leads to ``kid`` (a code node's child) at each coefficient of ``ks``."""
    if kid is None:
        return [_NO] * len(ks)
    if kid > 0:
        return [_data_state(block, k, kid, 0) if k <= limits[kid] else _NO for k in ks]
    moves = []
    for k in ks:
        k, extra = _after_symbol(~kid, k)
        moves.append(_NO if k < 0 else _data_state(block, k, 0, extra) if extra or k < 64 else ended)
    return moves


def _data_state(block: int, k: int, node: int, extra: int) -> int:
    """The packed DATA state (no stuffing pending): ``JpegGrammar._pack((DATA, block, k, node, extra, 0))``."""
    return DATA | block << 3 | k << 7 | node << 14 | extra << 23


def _symbol(tree: _Tree, node: int, k: int, bit: int) -> tuple[int, int]:
    """The Huffman code bit that is not inside a code: ``(k, extra)`` after its symbol (k = 64: the block ended).

    Raises :class:`_Reject` for bits that start no code, or no code valid at coefficient ``k``: a partial code is
    refused as soon as every code it starts is (say, only codes with long zero runs remain near coefficient 63),
    so that every accepted state can still be completed.
    """
    children, prefixes, limits = tree
    child = children[node][bit]
    if child is None or child > 0:
        code, length = prefixes[node]
        bits = format(code << 1 | bit, f"0{length + 1}b")
        valid = "" if child is None else f" valid at coefficient {k}"
        raise _Reject(f"no {'DC' if k == 0 else 'AC'} Huffman code{valid} starts with bits {bits}")
    symbol = ~child
    if k == 0:
        return 1, symbol  # DC: `symbol` magnitude bits follow
    run, size = symbol >> 4, symbol & 15
    if size:
        if k + run > 63:
            raise _Reject(f"a run of {run} zeros from coefficient {k} passes coefficient 63")
        return k + run + 1, size
    if run == 15:  # ZRL: 16 zeros
        if k + 16 > 64:
            raise _Reject(f"ZRL at coefficient {k} passes coefficient 63")
        return k + 16, 0
    return 64, 0  # EOB


_BIG = 1 << 30  # "no way to finish" in bit costs


class _Finisher:
    """The cheapest continuation of every state, and its length in bytes (see "Budget" in the module docstring).

    The continuation is a deterministic function of the bit-level decoder state: extra bits are 0s, and a Huffman
    code bit goes to the child with the fewest bits left to end the block (0 on ties), so the rest of the block
    takes the fewest bits possible; each further block is its cheapest block, padding is 1s. Being Markov, the
    continuation of a state's successor along it is its own tail: ``cost(step(s, next_byte(s))) == cost(s) - 1``.

    Attributes:
        mcu_bits: bits of the cheapest MCU (``M``).
        max_finish_bits: an upper bound on the bits the cheapest continuation takes to end the current MCU, over
            every DATA state (``c_max``).
        ff_free: no 8 consecutive bits of the repeated cheapest MCU are all 1s: only bytes holding bits of the
            current MCU or padding may need stuffing.
        left: MCUs left in the interval after ``m`` MCUs (unclipped), per ``m``.
        tail: bytes of the cheapest intervals from MCU ``m`` on, ``m`` an interval boundary (markers included).
    """

    def __init__(self, grammar: JpegGrammar) -> None:
        self.grammar = grammar
        if grammar._fingerprint not in _COSTS:  # shared by grammars of equal Huffman trees and blocks
            tables: dict[tuple[int, int], tuple[list[list[int]], list[int]]] = {}
            for dc, ac in grammar._trees:
                if (id(dc), id(ac)) not in tables:
                    tables[id(dc), id(ac)] = _cost_rows(dc, ac)
            _COSTS[grammar._fingerprint] = [tables[id(dc), id(ac)] for dc, ac in grammar._trees]
        self.tables = _COSTS[grammar._fingerprint]
        block_bits = [rows[0][0] for rows, _ in self.tables]
        self.mcu_bits = sum(block_bits)
        rest = [sum(block_bits[b + 1 :]) for b in range(len(block_bits))]
        worst = [max(_finite_max(rows), 15 + _finite_max([end])) for rows, end in self.tables]  # 15: widest extra
        self.max_finish_bits = max(w + r for w, r in zip(worst, rest, strict=True))
        pattern = self._mcu_pattern()
        self.ff_free = "1" * 8 not in pattern * (2 + 8 // len(pattern))
        codec = grammar.codec
        interval, total = codec.restart_interval, codec.num_mcus
        self.left = [min(interval - m % interval, total - m) for m in range(total)]
        self._memo: dict[tuple[int, int], int] = {}
        self._bytes: dict[tuple[int, int], tuple[int, int, int]] = {}
        if grammar._fingerprint not in _CHOICES:
            _CHOICES[grammar._fingerprint] = self._all_choices()
        self._choices = _CHOICES[grammar._fingerprint]  # bit state -> its cheapest next bit
        self.tail = [0] * (total + 1)
        for first in reversed(range(0, total, interval)):
            self.tail[first] = self._interval(grammar._scan, self.left[first]) + self.tail[first + self.left[first]]

    def cost(self, state: State) -> int:
        """Bytes of the cheapest continuation of ``state`` to EOI."""
        local, mcus = state
        if local & 7 == DATA:
            n = self.left[mcus]
            total = self._memo.get((local, n))
            return (self._interval(local, n) if total is None else total) + self.tail[mcus + n]
        fields = self.grammar._unpack(local)
        phase = fields[0]
        if phase == HEAD:
            return len(self.grammar.header) - fields[1] + self.tail[0]
        if phase == MARK1:
            return fields[2] + 2 + self.tail[mcus]
        return 1 + self.tail[mcus] if phase == MARK2 else 0

    def bound(self, state: State) -> int:
        """An upper bound on :meth:`cost` that takes no walk: a DATA state's cheapest continuation takes at most
        ``c_max`` bits to end its MCU, then ``M`` for each further MCU of the interval; it stuffs at most every data
        byte (with ``ff_free``: those holding bits of the current MCU, and the padding byte)."""
        local, mcus = state
        if local & 7 != DATA:
            return self.cost(state)
        n = self.left[mcus]
        data = -(-(self.max_finish_bits + (n - 1) * self.mcu_bits) // 8)
        stuffed = min(data, -(-self.max_finish_bits // 8) + 1) if self.ff_free else data
        return int(local & _STUFF > 0) + data + stuffed + 2 + self.tail[mcus + n]

    def next_byte(self, state: State) -> int:
        """The first byte of the cheapest continuation of an unfinished ``state``."""
        fields = self.grammar._unpack(state.local)
        phase = fields[0]
        if phase == HEAD:
            return self.grammar.header[fields[1]]
        if phase == MARK2:
            return fields[1]
        if fields[-1]:
            return 0
        return 0xFF if phase == MARK1 else self._data_byte(state.local, self.left[state.mcus])

    def _interval(self, local: int, n: int) -> int:
        """Bytes of the cheapest continuation of DATA ``local`` with ``n`` MCUs left in the interval, through the
        interval's marker (memoized per ``(local, n)``, filled backwards along the continuation)."""
        memo, path = self._memo, []
        total = memo.get((local, n))
        if total is None and len(memo) >= _MOVE_LIMIT:
            memo.clear()
        while total is None:
            path.append((local, n))
            if local & _STUFF:  # the stuffed 0x00
                local ^= _STUFF
            else:
                byte, after, done = self._cheapest(local, n)
                if done == n:  # the interval ended: padding written, (a stuffed 0x00,) the marker
                    total = int(byte == 0xFF) + 2
                    break
                local, n = after, n - done
            total = memo.get((local, n))
        for key in reversed(path):
            total += 1
            memo[key] = total
        return total

    def _data_byte(self, local: int, n: int) -> int:
        """The next byte of the cheapest continuation of DATA ``local`` (no stuffing pending), ``n`` MCUs left."""
        return self._cheapest(local, n)[0]

    def _cheapest(self, local: int, n: int) -> tuple[int, int, int]:
        """``(byte, local after it, MCUs it finishes)``: the next byte of the cheapest continuation of DATA ``local``
        (no stuffing pending) with ``n`` MCUs left in the interval, and where it leads (when it ends the interval,
        the rest of it is padding and the local is meaningless). Memoized per ``(local, min(n, 9))``."""
        key = (local, min(n, _CLIP))
        found = self._bytes.get(key)
        if found is None:
            if len(self._bytes) >= _MOVE_LIMIT:
                self._bytes.clear()
            grammar, choices, start = self.grammar, self._choices, local
            byte = done = 0
            for _ in range(8):
                bit = 1  # padding once the interval ended
                if done < n:
                    bit = choices.get(local)
                    if bit is None:
                        bit = choices[local] = self._bit(*grammar._unpack(local)[1:5])[0]
                    local = (grammar._pairs.get(local) or grammar._pair(local))[bit]
                    if local == _CTX:  # the MCU ended
                        local, done = grammar._scan, done + 1
                    elif local == _NO:
                        raise AssertionError(f"the cheapest bit {bit} was refused from {grammar._unpack(start)}")
                byte = byte << 1 | bit
            found = self._bytes[key] = (byte, local | _STUFF if byte == 0xFF else local, done)
        return found

    def _bit(self, block: int, k: int, node: int, extra: int) -> tuple[int, int, int, int, bool]:
        """The cheapest next bit: ``(bit, k, node, extra, whether the block ended)`` after it."""
        if extra:
            return 0, k, node, extra - 1, extra == 1 and k == 64
        rows, end = self.tables[block]
        tree = self.grammar._trees[block][k != 0]
        costs = [_child_cost(tree, k, child, rows[k], end) for child in tree[0][node]]
        bit = int(costs[1] < costs[0])
        if costs[bit] >= _BIG:
            raise AssertionError(f"no code can finish block {block} from node {node} at coefficient {k}")
        child = tree[0][node][bit]
        if child > 0:
            return bit, k, child, 0, False
        k, extra = _symbol(tree, node, k, bit)
        return bit, k, 0, extra, not extra and k == 64

    def _all_choices(self) -> dict[int, int]:
        """The cheapest next bit (:meth:`_bit`) of every bit state at a Huffman code node that can end its block,
        in bulk (0 for extra bits, left to :meth:`_bit`): some 60,000 for 4:2:0, built once per block layout."""
        choices: dict[int, int] = {}
        for block, (dc, ac) in enumerate(self.grammar._trees):
            rows, end = self.tables[block]
            for tree, ks in ((dc, range(1)), (ac, range(1, 64))):
                children, _, limits = tree
                for node, kids in enumerate(children):
                    for k in ks:
                        if node and k > limits[node]:
                            continue
                        zero, one = (_child_cost(tree, k, kid, rows[k], end) for kid in kids)
                        if min(zero, one) < _BIG:
                            choices[_data_state(block, k, node, 0)] = int(one < zero)
        return choices

    def _mcu_pattern(self) -> str:
        """The bits of the cheapest MCU, as a string of 0s and 1s."""
        bits, k, node, extra = [], 0, 0, 0
        for block in range(len(self.tables)):
            ended = False
            while not ended:
                bit, k, node, extra, ended = self._bit(block, k, node, extra)
                bits.append(str(bit))
            k = 0
        return "".join(bits)


def _cost_rows(dc: _Tree, ac: _Tree) -> tuple[list[list[int]], list[int]]:
    """Fewest bits to end a block with these trees: ``rows[k][node]`` from a code node at coefficient ``k`` (0 =
    DC, then the DC tree's nodes), ``end[k]`` from the AC root at ``k`` (``end[64] = 0``); :data:`_BIG`: none."""
    end = [_BIG] * 65
    end[64] = 0
    rows: list[list[int]] = [[]] * 64
    for k in range(63, -1, -1):
        tree = dc if k == 0 else ac
        row = rows[k] = [_BIG] * len(tree[0])
        for node in range(len(row) - 1, -1, -1):  # children have larger ids than their parents
            row[node] = min(_BIG, 1 + min(_child_cost(tree, k, child, row, end) for child in tree[0][node]))
        if k:
            end[k] = row[0]
    return rows, end


def _child_cost(tree: _Tree, k: int, child: int | None, row: list[int], end: list[int]) -> int:
    """Fewest bits to end the block after the bit that leads to ``child`` at coefficient ``k`` (as :func:`_bits`)."""
    if child is None:
        return _BIG
    if child > 0:
        return row[child] if k <= tree[2][child] else _BIG
    symbol = ~child
    if k == 0:
        return symbol + end[1]
    run, size = symbol >> 4, symbol & 15
    if size:
        return _BIG if k + run > 63 else size + end[k + run + 1]
    if run == 15:
        return _BIG if k + 16 > 64 else end[k + 16]
    return 0


def _finite_max(rows: list[list[int]]) -> int:
    return max(cost for row in rows for cost in row if cost < _BIG)


class TokenGrammar:
    """The grammar over a tokenizer's ids: which ids may follow a state.

    Masks are cached under an exact key that drops what no single token can reach (see the module docstring),
    so one image's walk computes only a few thousand of them; a mask is built on a miss by walking a byte trie
    of the token pieces from the state. Tokens may cross restart markers anywhere: correctness does not rely on
    the tokenizer's pre-tokenization. With a budget of ids left, :meth:`allowed` keeps only ids after which the
    stream can still be finished in time (see "Budget" in the module docstring).

    Args:
        grammar: the byte grammar.
        pieces: ``pieces[i]`` = the bytes id ``i`` writes; None (or empty) for ids never to be drawn (specials).
        eos_id: the id that ends generation; allowed exactly when the stream is finished, and then alone.
        num_ids: length of the masks (the model's vocabulary; may exceed ``len(pieces)``).
    """

    def __init__(self, grammar: JpegGrammar, pieces: Sequence[bytes | None], eos_id: int, num_ids: int) -> None:
        if len(pieces) > num_ids or not 0 <= eos_id < num_ids:
            raise ValueError(f"need len(pieces) <= num_ids and 0 <= eos_id < num_ids, got {len(pieces)}, {eos_id}")
        self.grammar = grammar
        self.pieces = [None if i == eos_id or not p else bytes(p) for i, p in enumerate(pieces)]
        self.eos_id = eos_id
        self.num_ids = num_ids
        self.max_len = max((len(p) for p in self.pieces if p), default=1)
        reach = 1 + (8 * self.max_len - 1) // grammar.min_mcu_bits  # most MCUs one token can finish
        contexts = grammar._ctx + [(0, 0)] * reach
        interned: dict[tuple[tuple[int, int], ...], int] = {}
        self._key_ids = [
            interned.setdefault(tuple(contexts[m : m + reach + 1]), len(interned)) for m in range(len(grammar._ctx))
        ]
        self._edges, self._ends = _trie(self.pieces)
        self._inner = [bool(out) for out in self._edges]  # trie nodes with children
        self._labels = [[byte for byte, _ in out] for out in self._edges]  # the bytes of each node's edges
        self._children = [[child for _, child in out] for out in self._edges]
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self._mask_limit = max(1 << 10, (1 << 26) // num_ids)  # masks kept: some 64 MB; past it the cache starts again
        self._steps: dict[tuple[int, int, int], tuple[int, int] | None] = {}
        self._bytes = {p[0] for p in self.pieces if p and len(p) == 1}
        self._rises: dict[tuple[int, ...], tuple[torch.Tensor, int, list[int]]] = {}
        # Rises of finish_cost per token are a function of the key alone when the key holds the exact number of
        # MCUs left in every interval it reaches (no interval is clipped, as with restart intervals <= 8).
        self._rises_by_key = grammar.codec.restart_interval < _CLIP
        self._margin: int | None | object = _UNSEEN
        self._cost: Any = None  # the finisher's cost, once every single byte is known to be a piece
        self._bound: Any = None  # and its upper bound

    @classmethod
    def for_tokenizer(
        cls, codec: JpegCodec, tokenizer: Any, offset: int = 0, num_ids: int | None = None
    ) -> TokenGrammar:
        """The grammar over a :class:`~jpeglm.tokenizer.CodecTokenizer`'s ids; the last few made are kept (per codec
        spec, tokenizer, offset and ``num_ids``), so that their caches serve every later call: the pipeline rebuilds
        the codec from its spec for each :func:`~jpeglm.generation.complete` (each gallery, each FID batch).

        Args:
            codec: the codec of the streams the tokenizer reads.
            tokenizer: the tokenizer; its ids ``>= 8`` are pieces, of the special ids only eos is ever allowed.
            offset: added to every non-special id, as in a mixed-modality model (``CodecTokenizer.shift``).
            num_ids: mask length; default ``tokenizer.num_ids + offset``.
        """
        from jpeglm.tokenizer import EOS_ID, NUM_SPECIAL

        num_ids = tokenizer.num_ids + offset if num_ids is None else num_ids
        key = (repr(sorted(codec.spec.items())), id(tokenizer), offset, num_ids)
        kept = _GRAMMARS.get(key)
        if kept is not None and kept[0] is tokenizer:
            return kept[1]
        pieces: list[bytes | None] = [None] * (tokenizer.num_ids + offset)
        for token_id in range(NUM_SPECIAL, tokenizer.num_ids):
            pieces[token_id + offset] = tokenizer.token_bytes(token_id)
        grammar = cls(JpegGrammar(codec), pieces, EOS_ID, num_ids)
        if len(_GRAMMARS) >= _GRAMMARS_KEPT:
            del _GRAMMARS[next(iter(_GRAMMARS))]
        _GRAMMARS[key] = (tokenizer, grammar)  # the tokenizer kept alive: its id stays its own
        return grammar

    @property
    def start(self) -> State:
        """The state before any byte (the byte grammar's)."""
        return self.grammar.start

    def check_prefix(self, stream: bytes) -> State:
        """The state after ``stream``: :meth:`JpegGrammar.check_prefix` (ValueError naming the first bad byte)."""
        return self.grammar.check_prefix(stream)

    def key(self, state: State) -> tuple[int, int]:
        """The cache key of ``state``: states with equal keys allow the same ids and move alike by each."""
        return state.local, self._key_ids[state.mcus]

    def allowed(self, state: State, budget: int | None = None) -> torch.Tensor:
        """``(num_ids,)`` bool: the ids that may follow ``state``; eos alone once the stream is finished.

        Args:
            state: the sequence's state.
            budget: None, or the number of ids the sequence may still draw, this one included: then only ids after
                which the stream can still be finished (:meth:`finish_cost`) with at most ``budget - 1`` more
                ids. A walk that draws from these masks, one id less each step, always finishes in time.

        Raises:
            ValueError: ``state`` cannot be finished within ``budget`` (``finish_cost(state) > budget``).

        The tensor may be cached and shared between states: do not modify it. With an ample budget
        (``budget - 1 >= finish_cost(state) + fast_margin``) it is the unconstrained mask itself.
        """
        key = (state.local, self._key_ids[state.mcus])
        mask, walked = self._masks.get(key), None
        if mask is None:
            if len(self._masks) >= self._mask_limit:
                self._masks.clear()
            walked = self._walk(state)
            mask = self._masks[key] = self._build_mask(state, walked)
        if budget is None or self._ample(state, budget):
            return mask
        cost = self.finish_cost(state)
        if cost > budget:
            raise ValueError(
                f"the stream cannot be finished within {budget} more id(s): it needs {cost} "
                f"({self.grammar.expected(state)} next)"
            )
        slack = budget - 1 - cost  # how much finish_cost may rise by the next id
        margin = self.fast_margin
        if cost == 0 or (margin is not None and slack >= margin):
            return mask
        return self._tight_mask(state, key, cost, slack, mask, walked)

    @property
    def fast_margin(self) -> int | None:
        """How much one token can raise :meth:`finish_cost` at most; None: no bound (every budget is checked).

        ``2 ceil(c_max / 8) + 2`` (see "Budget" in the module docstring), when the cheapest MCU repeated never
        holds 8 1-bits in a row (true for the standard Huffman tables).
        """
        if self._margin is _UNSEEN:
            finisher = self.grammar._finisher()
            self._margin = 2 * -(-finisher.max_finish_bits // 8) + 2 if finisher.ff_free else None
        return self._margin  # type: ignore[return-value]

    def finish_cost(self, state: State) -> int:
        """The fewest ids known to finish ``state``: EOI written (eos not counted); 0 once finished.

        An achievable upper bound: the cheapest byte continuation (:meth:`JpegGrammar.finish_stream`), one
        single-byte id per byte, so it needs every single byte among the pieces. Multi-byte tokens may finish in
        fewer ids. Cached: a dict lookup per state once seen.

        Raises:
            ValueError: some single byte is no piece.
        """
        cost = self._cost
        if cost is None:
            if len(self._bytes) < 256:
                raise ValueError(f"finish_cost needs every single byte among the pieces; {256 - len(self._bytes)} lack")
            finisher = self.grammar._finisher()
            cost, self._cost, self._bound = finisher.cost, finisher.cost, finisher.bound
        return cost(state)

    def _ample(self, state: State, budget: int) -> bool:
        """Whether ``budget`` leaves the plain mask of ``state`` as it is (``budget - 1 >= finish_cost(state) +
        fast_margin``), decided on an upper bound of :meth:`finish_cost` that takes no walk (``_Finisher.bound``)."""
        margin = self._margin if self._margin is not _UNSEEN else self.fast_margin
        if margin is None:
            return False
        if self._cost is None:
            self.finish_cost(state)  # raises ValueError when some single byte is no piece
        return budget - 1 - self._bound(state) >= margin

    def allows(self, state: State, token_id: int, budget: int | None = None) -> bool:
        """``allowed(state, budget)[token_id]``, without the mask: a walk of that id's bytes alone.

        Some microseconds for a state never seen, where a mask takes a walk of the whole token trie: a sampler can
        draw from all ids first and build the mask only when the draw is refused (see :class:`GrammarConstraint`).

        Raises:
            ValueError: as :meth:`allowed`, ``finish_cost(state) > budget``.
        """
        if state.local & 7 == DONE:
            return token_id == self.eos_id
        if budget is None or self._ample(state, budget):
            return self.step(state, token_id) is not None
        cost = self.finish_cost(state)
        if cost > budget:
            self.allowed(state, budget)  # raises, with its message
        after = self.step(state, token_id)
        margin = self._margin if self._margin is not _UNSEEN else self.fast_margin
        return after is not None and (
            (margin is not None and budget - 1 - cost >= margin) or self.finish_cost(after) <= budget - 1
        )

    def step(self, state: State, token_id: int) -> State | None:
        """The state after the bytes of ``token_id``, or None if it may not follow ``state`` (memoized)."""
        key = (state.local, self._key_ids[state.mcus], token_id)
        moved = self._steps.get(key, _UNSEEN)
        if moved is _UNSEEN:
            if len(self._steps) >= _MOVE_LIMIT:
                self._steps.clear()
            piece = self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None
            after = None if piece is None else self.grammar.advance(state, piece)
            moved = self._steps[key] = None if after is None else (after.local, after.mcus - state.mcus)
        return None if moved is None else State(moved[0], state.mcus + moved[1])

    def _tight_mask(
        self, state: State, key: tuple[int, int], cost: int, slack: int, mask: torch.Tensor, walked: list | None
    ) -> torch.Tensor:
        """``mask`` less the ids that raise :meth:`finish_cost` by more than ``slack`` (rises cached per key;
        ``walked``: :meth:`_walk` of ``state`` when the caller has it)."""
        rises_key = key if self._rises_by_key else (*key, state.mcus)
        rises = self._rises.get(rises_key)
        if rises is None:
            if len(self._rises) >= self._mask_limit:
                self._rises.clear()
            rises = self._rises[rises_key] = self._build_rises(cost, self._walk(state) if walked is None else walked)
        ids, low, cuts = rises
        if slack < low:
            raise AssertionError(f"no id keeps {state} finishable: slack {slack}, cheapest rise {low}")
        if slack - low >= len(cuts) - 1:
            return mask
        import torch

        out = torch.zeros(self.num_ids, dtype=torch.bool)
        out[ids[: cuts[slack - low]]] = True
        return out

    def _build_rises(self, cost: int, walked: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int, list[int]]:
        """The allowed ids (the walk ``walked`` of a state of finish cost ``cost``) by how much each raises
        :meth:`finish_cost`: ``(ids, low, cuts)``, ids sorted by rise, the lowest rise ``low``, and ``cuts[r - low]``
        = how many ids rise by at most ``r``."""
        self.finish_cost(self.start)  # raises ValueError when some single byte is no piece
        finisher, ends = self.grammar._finisher(), self._ends
        memo, left, tail, interval = finisher._memo, finisher.left, finisher.tail, finisher._interval
        rises = []
        for node, local, mcus in walked:
            tokens = ends[node]
            if not tokens:  # inside longer pieces only
                continue
            if local & 7 == DATA:  # finisher.cost(state), inlined: some 30000 calls per tight image
                n = left[mcus]
                done = memo.get((local, n))
                rise = (interval(local, n) if done is None else done) + tail[mcus + n] - cost
            else:
                rise = finisher.cost(State(local, mcus)) - cost
            for token in tokens:
                rises.append((rise, token))
        pairs = sorted(rises)
        low = pairs[0][0]
        cuts = [0] * (pairs[-1][0] - low + 1)
        for rise, _ in pairs:
            cuts[rise - low] += 1
        for i in range(1, len(cuts)):
            cuts[i] += cuts[i - 1]
        import torch

        return torch.from_numpy(np.array([token for _, token in pairs], dtype=np.int64)), low, cuts

    def _build_mask(self, state: State, walked: list[tuple[int, int, int]]) -> torch.Tensor:
        """The mask of ``state``: the ids whose piece ends at a trie node its walk ``walked`` reaches."""
        ends = self._ends
        flags = bytearray(self.num_ids)  # (torch.tensor of a list of ids is 10x slower)
        if self.grammar.finished(state):
            flags[self.eos_id] = 1
        for node, _, _ in walked:
            for token in ends[node]:
                flags[token] = 1
        import torch

        return torch.frombuffer(flags, dtype=torch.bool)

    def _walk(self, state: State) -> list[tuple[int, int, int]]:
        """``(node, local, mcus)`` for every piece-trie node whose bytes may follow ``state``, and the state after
        them: a depth-first walk of the trie that drops a branch at its first bad byte. A node with many edges
        reads the byte row of its state in bulk; single-child chains are followed in place, byte by byte."""
        grammar, edges = self.grammar, self._edges
        rows, make_row, moves, byte_move, ctx_move = (
            grammar._rows,
            grammar._row,
            grammar._moves,
            grammar._byte_move,
            grammar._ctx_move,
        )
        reached: list[tuple[int, int, int]] = []
        stack = [(0, state.local, state.mcus)]
        while stack:
            node, local, mcus = stack.pop()
            out = edges[node]
            if len(out) > 8:
                self._bulk(node, rows.get(local) or make_row(local), local, mcus, reached, stack)
                continue
            for byte, child in out:
                at, count = local, mcus
                while True:
                    moved = moves.get(at << 8 | byte)
                    if moved is None:
                        moved = byte_move(at, byte)
                    if moved >= 0:
                        at = moved
                    elif moved == _NO:
                        break
                    else:  # the byte finishes an MCU: its move reads the context
                        after = ctx_move(at, count, byte)
                        if after is None:
                            break
                        at, count = after
                    reached.append((child, at, count))
                    if len(edges[child]) != 1:
                        if edges[child]:
                            stack.append((child, at, count))
                        break
                    ((byte, child),) = edges[child]
        return reached

    def _bulk(self, node: int, row: list[int], local: int, mcus: int, reached: list, stack: list) -> None:
        """The moves of trie node ``node``'s edges from ``(local, mcus)``, whose byte row is ``row``: onto
        ``reached``, and those of children with children onto ``stack`` (see :meth:`_walk`)."""
        labels, children, ctx_move = self._labels[node], self._children[node], self.grammar._ctx_move
        moves = map(row.__getitem__, labels)
        got = [(child, moved, mcus) for child, moved in zip(children, moves, strict=True) if moved >= 0]
        if _CTX in row:  # a byte that finishes an MCU: its move reads the context
            for byte, child in self._edges[node]:
                if row[byte] == _CTX:
                    after = ctx_move(local, mcus, byte)
                    if after is not None:
                        got.append((child, *after))
        reached += got
        inner = self._inner
        stack += [after for after in got if inner[after[0]]]


# ---------------------------------------------------------------------- helpers


def _marker_name(marker: int) -> str:
    return "EOI" if marker == _EOI else f"RST{marker - 0xD0}"


def _code_tree(lut: list[int]) -> _Tree:
    """The code tree of a 16-bit Huffman lookup table (``jpeg._parse_dht``'s entries: length << 8 | symbol).

    Returns:
        ``(children, prefixes, limits)``: ``children[node] = [child of bit 0, child of bit 1]``, each a node id > 0,
        ``~symbol`` (< 0) for a complete code, or None where no code continues; ``prefixes[node] = (bits, length)``;
        ``limits[node]`` = the last AC coefficient index at which some code below ``node`` is valid (-1: none).
    """
    children: list[list[int | None]] = [[None, None]]
    prefixes = [(0, 0)]
    index = 0
    while index < 1 << 16:
        entry = lut[index]
        if not entry:
            index += 1
            continue
        length, symbol = entry >> 8, entry & 0xFF
        code, node = index >> (16 - length), 0
        for depth in range(length - 1, 0, -1):
            bit = (code >> depth) & 1
            if children[node][bit] is None:
                children[node][bit] = len(children)
                children.append([None, None])
                prefixes.append((code >> depth, length - depth))
            node = children[node][bit]
        children[node][code & 1] = ~symbol
        index += 1 << (16 - length)
    limits = [-1] * len(children)
    for node in range(len(children) - 1, -1, -1):  # children have larger ids than their parents
        for child in children[node]:
            if child is not None:
                limits[node] = max(limits[node], limits[child] if child > 0 else _last_k(~child))
    return children, prefixes, limits


def _last_k(symbol: int) -> int:
    """The last coefficient index at which an AC symbol may be read: EOB anywhere, ZRL to 48, others to 63 - run."""
    run, size = symbol >> 4, symbol & 15
    if size:
        return 63 - run
    return 48 if run == 15 else 63


def _shortest(children: list[list[int | None]]) -> int:
    """Length of the shortest code of a code tree."""
    depth, frontier = 1, [0]
    while frontier:
        if any(c is not None and c < 0 for n in frontier for c in children[n]):
            return depth
        frontier = [c for n in frontier for c in children[n] if c is not None]
        depth += 1
    raise ValueError("empty Huffman table")


def _trie(pieces: Sequence[bytes | None]) -> tuple[list[list[tuple[int, int]]], list[list[int]]]:
    """Byte trie of the pieces: ``edges[node] = [(byte, child)]``, ``ends[node]`` = ids whose piece ends there."""
    children: list[dict[int, int]] = [{}]
    ends: list[list[int]] = [[]]
    for token_id, piece in enumerate(pieces):
        if not piece:
            continue
        node = 0
        for byte in piece:
            child = children[node].get(byte)
            if child is None:
                child = children[node][byte] = len(children)
                children.append({})
                ends.append([])
            node = child
        ends[node].append(token_id)
    return [sorted(c.items()) for c in children], ends
