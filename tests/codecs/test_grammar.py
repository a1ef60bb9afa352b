"""The JPEG stream grammar (jpeglm/codecs/grammar.py): byte automaton and token masks for constrained sampling.

Independent referees: real libjpeg streams (everything they hold must be accepted), ``JpegCodec.decode`` (its own
LUT-based Huffman walk says whether a stream is complete) and Pillow/libjpeg (every sampled stream must load
without a warning).
"""

from __future__ import annotations

import io
import random
import re
import warnings

import numpy as np
import pytest
import torch
from media import PHOTOS
from PIL import Image, ImageOps

from jpeglm.codecs import JpegCodec
from jpeglm.codecs.grammar import _CTX, _NO, JpegGrammar, State, TokenGrammar
from jpeglm.generation.sampling import GrammarConstraint, _Sampler
from jpeglm.tokenizer import EOS_ID, NUM_SPECIAL

RST = re.compile(rb"\xff[\xd0-\xd7]")
SETTINGS = {
    "256": dict(size=256),
    "256-r4": dict(size=256, restart_interval=4),
    "64": dict(size=64),
    "64-r3": dict(size=64, restart_interval=3),
    "64-444": dict(size=64, subsampling="4:4:4"),
    "64-422-r4": dict(size=64, subsampling="4:2:2", restart_interval=4),
    "64-444-r16": dict(size=64, subsampling="4:4:4", restart_interval=16),
}
_GRAMMARS: dict[str, tuple[JpegCodec, JpegGrammar]] = {}


def grammar_for(name: str) -> tuple[JpegCodec, JpegGrammar]:
    if name not in _GRAMMARS:
        codec = JpegCodec(**SETTINGS[name])
        _GRAMMARS[name] = codec, JpegGrammar(codec)
    return _GRAMMARS[name]


def streams_for(codec: JpegCodec, count: int = len(PHOTOS)) -> list[bytes]:
    out = []
    for path in PHOTOS[:count]:
        with Image.open(path) as im:
            out += [codec.encode(path), codec.encode(ImageOps.mirror(im))]
    return out


def offset_of(error: pytest.ExceptionInfo) -> int:
    return int(re.match(r"byte (\d+) ", str(error.value)).group(1))


def loads_cleanly(codec: JpegCodec, stream: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(io.BytesIO(codec.to_jpeg(stream))) as im:
            im.load()
            assert im.size == (codec.size, codec.size)


def walk(tokens: TokenGrammar, rng: random.Random, state: State | None = None, greedy: int = 1) -> tuple[bytes, list]:
    """Draw allowed ids from ``state`` until eos is the only one: the bytes written and the states passed.

    ``greedy`` > 1 draws that many allowed ids and keeps the one that gets furthest (MCU, block, coefficient).
    """
    grammar = tokens.grammar
    state = grammar.start if state is None else state
    out, states = [], []
    while True:
        states.append(state)
        mask = tokens.allowed(state)
        assert bool(mask[tokens.eos_id]) == grammar.finished(state)
        ids = torch.nonzero(mask).flatten().tolist()
        if grammar.finished(state):
            assert ids == [tokens.eos_id]
            return b"".join(out), states
        assert ids, f"dead end: {grammar.expected(state)}"
        options = [(tokens.step(state, i), i) for i in rng.sample(ids, min(greedy, len(ids)))]
        state, token = max(options, key=lambda o: (o[0].mcus, grammar.unpack(o[0])[1:3]))
        assert state is not None
        out.append(tokens.pieces[token])


def brute_mask(tokens: TokenGrammar, state: State) -> list[int]:
    """The allowed ids of ``state`` by advancing the byte grammar over every piece on its own."""
    grammar = tokens.grammar
    ids = [i for i, p in enumerate(tokens.pieces) if p and grammar.advance(state, p) is not None]
    return [tokens.eos_id] if grammar.finished(state) else ids


# ---------------------------------------------------------------------- real streams


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_prefix_of_a_real_stream_is_accepted_and_only_the_whole_is_finished(name):
    codec, grammar = grammar_for(name)
    for stream in streams_for(codec, 2 if codec.size == 256 else len(PHOTOS)):
        assert len(RST.findall(stream)) == codec.num_intervals - 1
        state, states = grammar.start, []
        for offset in range(len(stream)):
            assert not grammar.finished(state)
            state = grammar.advance(state, stream[offset : offset + 1])
            assert state is not None, f"{name}: real stream rejected at byte {offset} of {len(stream)}"
            states.append(state)
        assert grammar.finished(state)
        assert grammar.check_prefix(stream) == state
        assert state.mcus == codec.num_mcus
        for cut in (1, len(codec.header), len(stream) // 3, len(stream) - 1):
            assert grammar.check_prefix(stream[:cut]) == states[cut - 1]
            assert grammar.advance(states[cut - 1], stream[cut:]) == state


def test_a_padding_byte_of_all_ones_is_stuffed_before_the_marker():
    """libjpeg stuffs a 0xFF that padding completes; such streams need noisy blocks that end on 1-bits."""
    codec = JpegCodec(size=32, quality=95, subsampling="4:4:4")
    grammar = JpegGrammar(codec)
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(20):
        stream = codec.encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert grammar.finished(grammar.check_prefix(stream))
        for match in re.finditer(rb"\xff\x00\xff[\xd0-\xd9]", stream):
            found += 1
            unstuffed = stream[: match.start() + 1] + stream[match.start() + 2 :]
            with pytest.raises(ValueError, match="0x00") as error:
                grammar.check_prefix(unstuffed)
            assert offset_of(error) == match.start() + 1
    assert found > 0


# ---------------------------------------------------------------------- corruptions


def _huffman_code(lut: list[int], symbol: int) -> str:
    index = next(i for i, entry in enumerate(lut) if entry and entry & 0xFF == symbol)
    return format(index >> (16 - (lut[index] >> 8)), f"0{lut[index] >> 8}b")


def _stuffed(bits: str) -> tuple[bytes, list[int]]:
    """Bits padded with 1s into stuffed bytes, and the stream offset of each data byte."""
    bits += "1" * (-len(bits) % 8)
    out, where = bytearray(), []
    for i in range(0, len(bits), 8):
        where.append(len(out))
        out.append(int(bits[i : i + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)
    return bytes(out), where


def test_invalid_bytes_are_rejected_exactly_where_they_stand(jpeg_codec):
    grammar = JpegGrammar(jpeg_codec)
    stream = jpeg_codec.encode(PHOTOS[0])
    head = len(jpeg_codec.header)
    stuffed = stream.index(b"\xff\x00", head)
    marker = RST.search(stream).start()
    cases = {  # corrupted stream -> (offset of the first bad byte, what the message says was expected)
        stream[:10] + bytes([stream[10] ^ 1]) + stream[11:]: (10, "header byte 10"),
        stream[: stuffed + 1] + b"\x12" + stream[stuffed + 2 :]: (stuffed + 1, "0x00"),
        stream[: marker + 1] + b"\xd1" + stream[marker + 2 :]: (marker + 1, "RST0"),
        stream[: marker + 1] + b"\xd9": (marker + 1, "0xD0"),
        stream[:-2] + b"\xff\xd7": (len(stream) - 1, "EOI"),
        stream[:-2] + b"\x12": (len(stream) - 2, "0xFF"),
        stream + b"\x00": (len(stream), "nothing"),
        stream[:head] + b"\xff\x00\x80": (head + 2, "no DC Huffman code starts with bits 111111111"),
    }
    # Coefficients past 63: DC 0, then ZRL-like runs (15, 1) three times (k = 49), then (15, 1) once more.
    dc, ac = jpeg_codec._layout.blocks[0]
    bits = _huffman_code(dc, 0) + (_huffman_code(ac, 0xF1) + "1") * 3 + _huffman_code(ac, 0xF1)
    data, where = _stuffed(bits)
    cases[stream[:head] + data] = (head + where[(len(bits) - 1) // 8], "passes coefficient 63")
    for corrupt, (offset, expected) in cases.items():
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            grammar.check_prefix(corrupt)
        assert offset_of(error) == offset, str(error.value)
        assert grammar.check_prefix(corrupt[:offset]) is not None
        assert not jpeg_codec.decode(corrupt).complete


def test_padding_must_be_ones(jpeg_codec):
    """Clearing a padding bit (found with the codec's own Huffman walk) is rejected at that byte."""
    grammar, layout = JpegGrammar(jpeg_codec), jpeg_codec._layout
    stream = jpeg_codec.encode(PHOTOS[1])
    start, tried = len(jpeg_codec.header), 0
    for match in RST.finditer(stream, start):
        part = stream[start : match.start()]
        data = part.replace(b"\xff\x00", b"\xff")
        pos = layout._mcu((int.from_bytes(data, "big") << 16) | 0xFFFF, 8 * len(data), 0)
        if 8 * len(data) - pos and data[-1] != 0xFF:  # padding bits, and no stuffing to keep in step
            corrupt = stream[: match.start() - 1] + bytes([stream[match.start() - 1] & 0xFE]) + stream[match.start() :]
            with pytest.raises(ValueError, match="padding") as error:
                grammar.check_prefix(corrupt)
            assert offset_of(error) == match.start() - 1
            tried += 1
        start = match.end()
        if tried == 5:
            break
    assert tried == 5


def test_random_corruptions_are_rejected_no_earlier_than_they_must(jpeg_tokenizer):
    """A changed byte often still reads as other coefficients: whatever the grammar accepts must be completable
    into a stream that decodes complete, and a fully accepted stream must decode complete."""
    codec, grammar = grammar_for("64")
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    rng = random.Random(1)
    rejected = 0
    for stream in streams_for(codec, 3):
        for _ in range(6):
            pos = rng.randrange(len(codec.header), len(stream))
            corrupt = bytearray(stream)
            corrupt[pos] = rng.choice([b for b in range(256) if b != stream[pos]])
            try:
                state = grammar.check_prefix(corrupt)
            except ValueError as e:
                offset = int(re.match(r"byte (\d+) ", str(e)).group(1))
                assert offset >= pos
                rejected += 1
                assert not codec.decode(bytes(corrupt)).complete or re.search(rb"\xff[^\x00\xd0-\xd9]", corrupt)
                state = grammar.check_prefix(corrupt[:offset])
                rest, _ = walk(tokens, rng, state, greedy=4)
                completed = bytes(corrupt[:offset]) + rest
            else:
                completed = bytes(corrupt) + walk(tokens, rng, state, greedy=4)[0]
            decoded = codec.decode(completed)
            assert decoded.complete, pos
            assert decoded.fraction == 1.0
            loads_cleanly(codec, completed)
    assert rejected > 0


def test_a_prompt_that_is_no_prefix_is_refused_with_its_offset(jpeg_codec):
    grammar = JpegGrammar(jpeg_codec)
    stream = jpeg_codec.encode(PHOTOS[2])
    prompt = jpeg_codec.prompt(stream, 0.5)
    state = grammar.check_prefix(prompt)
    assert not grammar.finished(state)
    assert state.mcus == jpeg_codec.num_mcus // 2
    small = JpegCodec(size=64).encode(PHOTOS[2])
    first = next(i for i, (a, b) in enumerate(zip(small, stream, strict=False)) if a != b)
    with pytest.raises(ValueError, match=rf"^byte {first} \(0x{small[first]:02X}\).*expected header byte {first}"):
        grammar.check_prefix(small)
    with pytest.raises(ValueError, match=r"byte 0 \(0x89\)"):
        grammar.check_prefix(b"\x89PNG")


# ---------------------------------------------------------------------- token masks


@pytest.mark.parametrize(("name", "walks"), [("64", 30), ("64-r3", 4), ("64-444", 3), ("64-422-r4", 3)])
def test_random_walks_under_the_masks_always_decode_complete(jpeg_tokenizer, name, walks):
    codec, _ = grammar_for(name)
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    rng = random.Random(name)
    for _ in range(walks):
        stream, states = walk(tokens, rng)
        decoded = codec.decode(stream)
        assert decoded.complete
        assert decoded.fraction == 1.0
        assert len(RST.findall(stream)) == codec.num_intervals - 1
        loads_cleanly(codec, stream)
        assert not any(tokens.grammar.finished(s) for s in states[:-1])


def _marker_crossing_pieces(streams: list[bytes], rng: random.Random) -> list[bytes | None]:
    """Single bytes plus chunks of real streams cut anywhere (across markers, stuffing, EOI), ids from 8 up."""
    chunks = {b"\xff\xd0", b"\x00\xff\xd1", b"\xff\xd9"}
    while len(chunks) < 150:
        stream = rng.choice(streams)
        start = rng.randrange(len(stream) - 1)
        chunks.add(stream[start : start + rng.randint(2, 12)])
    for marker in RST.finditer(streams[0]):
        chunks.add(streams[0][marker.start() - 3 : marker.end() + 3])
    return [None] * NUM_SPECIAL + [bytes([b]) for b in range(256)] + sorted(chunks)


@pytest.mark.parametrize(("pieces", "name"), [("tokenizer", "64"), ("crossing", "64"), ("tokenizer", "64-444-r16")])
def test_cached_masks_and_steps_equal_fresh_ones(jpeg_tokenizer, pieces, name):
    """States far apart share a key (and so a cached mask) when no token reaches what tells them apart."""
    codec, grammar = grammar_for(name)
    rng = random.Random(pieces + name)
    if pieces == "tokenizer":
        tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    else:
        tokens = TokenGrammar(grammar, _marker_crossing_pieces(streams_for(codec), rng), EOS_ID, 600)
    states = [s for _ in range(2) for s in walk(tokens, rng)[1]]
    ids = {piece: i for i, piece in enumerate(tokens.pieces) if piece}
    for stream in streams_for(codec):  # real streams cut into the longest pieces that fit
        state, pos = grammar.start, 0
        while pos < len(stream):
            piece = next(stream[pos : pos + n] for n in range(tokens.max_len, 0, -1) if stream[pos : pos + n] in ids)
            tokens.allowed(state)
            states.append(state)
            state, pos = tokens.step(state, ids[piece]), pos + len(piece)
        assert grammar.finished(state)
    seen: dict[tuple[int, int], State] = {}
    shared = [s for s in states if seen.setdefault(tokens.key(s), s).mcus != s.mcus]  # cached for another state
    assert len(shared) > 100
    fresh = TokenGrammar(grammar, tokens.pieces, EOS_ID, tokens.num_ids)
    for state in rng.sample(shared, 40) + [states[-1], grammar.start]:
        expected = brute_mask(tokens, state)
        assert torch.nonzero(tokens.allowed(state)).flatten().tolist() == sorted(expected)
        assert torch.equal(tokens.allowed(state), fresh.allowed(state))
        for token in rng.sample(range(tokens.num_ids), 30) + expected[:10]:
            piece = tokens.pieces[token] if token < len(tokens.pieces) else None
            assert tokens.step(state, token) == (piece and grammar.advance(state, piece)), (state, token)


def test_eos_only_when_finished_and_specials_never(jpeg_tokenizer):
    codec, grammar = grammar_for("64")
    stream = streams_for(codec, 1)[0]
    plain = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    shifted = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer, offset=1000, num_ids=2000)
    ids = jpeg_tokenizer.encode(stream)
    state = shifted_state = grammar.start
    for token in ids:
        mask, shifted_mask = plain.allowed(state), shifted.allowed(shifted_state)
        assert mask.shape == (jpeg_tokenizer.num_ids,)
        assert shifted_mask.shape == (2000,)
        assert bool(mask[token])
        assert not mask[:NUM_SPECIAL].any()
        assert torch.equal(shifted_mask[1000 + NUM_SPECIAL : 1000 + jpeg_tokenizer.num_ids], mask[NUM_SPECIAL:])
        assert not shifted_mask[: 1000 + NUM_SPECIAL].any()
        assert not shifted_mask[1000 + jpeg_tokenizer.num_ids :].any()
        state, shifted_state = plain.step(state, token), shifted.step(shifted_state, token + 1000)
        assert state == shifted_state
    assert grammar.finished(state)
    assert plain.allowed(state).nonzero().flatten().tolist() == [EOS_ID]
    assert shifted.allowed(state).nonzero().flatten().tolist() == [EOS_ID]
    assert plain.step(state, ids[0]) is None
    assert plain.step(grammar.start, EOS_ID) is None
    assert plain.step(grammar.start, 3) is None
    assert plain.step(grammar.start, 10**6) is None


# ---------------------------------------------------------------------- budgets


def budget_walk(
    tokens: TokenGrammar, rng: random.Random, budget: int, state: State | None = None
) -> tuple[bytes, list]:
    """Draw uniformly among ``allowed(state, ids left)`` until the stream is finished: the bytes and states passed.

    Checks on the way that no mask is empty and that the state stays finishable within the ids left.
    """
    grammar = tokens.grammar
    state = grammar.start if state is None else state
    out, states = [], []
    while not grammar.finished(state):
        assert budget > 0, "ran out of ids before EOI"
        assert tokens.finish_cost(state) <= budget
        states.append((state, budget))
        ids = torch.nonzero(tokens.allowed(state, budget)).flatten().tolist()
        assert ids, f"dead end with {budget} ids left: {grammar.expected(state)}"
        assert tokens.eos_id not in ids
        token = rng.choice(ids)
        state, budget = tokens.step(state, token), budget - 1
        out.append(tokens.pieces[token])
    return b"".join(out), states


def filtered(tokens: TokenGrammar, state: State, budget: int) -> list[int]:
    """The budget mask by its definition: allowed ids whose successor can be finished with ``budget - 1`` ids."""
    return [t for t in brute_mask(tokens, state) if tokens.finish_cost(tokens.step(state, t)) <= budget - 1]


@pytest.mark.parametrize(("name", "extras"), [("64", (0, 1, 3, None)), ("64-r3", (0, 2)), ("64-444-r16", (0, 120))])
def test_uniform_walks_under_a_budget_always_finish_in_time(jpeg_tokenizer, name, extras):
    """An untrained model at temperature 1 (uniform over allowed ids) finishes with budget ``finish_cost(start) + k``,
    even ``k = 0``, and with the lead's moderate 300 ids (None), from the start and from a prompt."""
    codec, grammar = grammar_for(name)
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    rng = random.Random(name)
    prompt = grammar.check_prefix(codec.prompt(streams_for(codec, 1)[0], 0.5)) if codec.num_intervals >= 16 else None
    for extra in extras:
        for start in (grammar.start, prompt) if prompt else (grammar.start,):
            budget = 300 if extra is None else tokens.finish_cost(start) + extra
            for _ in range(2):
                stream, states = budget_walk(tokens, rng, budget, start)
                assert len(states) <= budget
                if start != grammar.start:
                    stream = codec.prompt(streams_for(codec, 1)[0], 0.5) + stream
                decoded = codec.decode(stream)
                assert decoded.complete
                assert decoded.fraction == 1.0
                loads_cleanly(codec, stream)


@pytest.mark.parametrize("name", ["64", "64-444-r16", "256-r4"])
def test_finish_cost_is_achieved_by_the_cheapest_continuation(jpeg_tokenizer, name):
    """From reachable states the cheapest continuation has exactly finish_cost bytes, each an allowed single-byte id
    that lowers finish_cost by one; greedy cheapest-token walks finish within finish_cost ids."""
    codec, grammar = grammar_for(name)
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    rng = random.Random(name)
    ids = {tokens.pieces[i]: i for i in range(len(tokens.pieces)) if tokens.pieces[i]}
    states = walk(tokens, rng)[1] if codec.size == 64 else []
    stream = streams_for(codec, 1)[0]
    states += [grammar.check_prefix(stream[:cut]) for cut in rng.sample(range(len(stream)), 30)]
    for state in rng.sample(states, min(len(states), 40)) + [grammar.start]:
        cost, rest = tokens.finish_cost(state), grammar.finish_stream(state)
        assert len(rest) == cost
        for byte in rest[:12]:
            token = ids[bytes([byte])]
            assert tokens.allowed(state, cost)[token]
            state = tokens.step(state, token)
            assert tokens.finish_cost(state) == cost - 1
            cost -= 1
        assert grammar.finished(grammar.advance(state, rest[12:]))
    for state in rng.sample(states, 3):
        cost, steps = tokens.finish_cost(state), 0
        while not grammar.finished(state):
            options = torch.nonzero(tokens.allowed(state, cost - steps)).flatten().tolist()
            state = min((tokens.step(state, t) for t in options), key=tokens.finish_cost)
            steps += 1
        assert steps <= cost


def test_finish_cost_is_exact_for_the_standard_tables():
    """With a marker after every MCU each interval takes the cheapest MCU's 32 bits (4:2:0), 4 bytes, + 2 marker bytes;
    and no prefix of a real stream costs more than the rest of that stream."""
    for name in ("64", "256"):
        codec, grammar = grammar_for(name)
        assert grammar.finish_bytes(grammar.start) == len(codec.header) + 6 * codec.num_mcus
        assert grammar.finish_bytes(grammar.start) == (155 if name == "64" else 1595)
    codec, grammar = grammar_for("64-444-r16")  # 14 bits per MCU: 16 MCUs in 28 bytes per interval
    assert grammar.finish_bytes(grammar.start) == len(codec.header) + codec.num_intervals * (28 + 2)
    for stream in streams_for(codec, 2):
        state = grammar.start
        for offset in range(len(stream)):
            assert grammar.finish_bytes(state) <= len(stream) - offset
            state = grammar.advance(state, stream[offset : offset + 1])
        assert grammar.finish_bytes(state) == 0


@pytest.mark.parametrize("name", ["64", "64-r3", "64-444-r16"])
def test_budget_masks_equal_their_definition_and_none_changes_nothing(jpeg_tokenizer, name):
    """Tight masks (cached per key for short intervals, far-apart states sharing them) equal the brute filter of a
    fresh grammar; ``budget=None`` is the plain mask itself; an ample budget gives it back too (the fast path)."""
    codec, grammar = grammar_for(name)
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    fresh = TokenGrammar(grammar, tokens.pieces, EOS_ID, tokens.num_ids)
    rng = random.Random(name)
    states = [s for s, _ in budget_walk(tokens, rng, tokens.finish_cost(grammar.start) + 2)[1]]
    states += walk(tokens, rng)[1][:-1]
    margin = tokens.fast_margin
    assert margin is not None
    for state in rng.sample(states, 25):
        cost, plain = tokens.finish_cost(state), tokens.allowed(state)
        assert tokens.allowed(state, None) is plain
        assert torch.nonzero(plain).flatten().tolist() == sorted(brute_mask(tokens, state))
        assert tokens.allowed(state, cost + 1 + margin) is plain
        assert tokens.allowed(state, 10**6) is plain
        for budget in sorted({cost, cost + 1, cost + rng.randint(2, margin)}):
            mask = tokens.allowed(state, budget)
            assert torch.nonzero(mask).flatten().tolist() == sorted(filtered(fresh, state, budget)), (state, budget)
            assert mask.any()
            assert torch.equal(mask, mask & plain)
        assert tokens.finish_cost(state) == fresh.finish_cost(state) == grammar.finish_bytes(state)
    for state in states:  # every state: some id lowers the finish cost, none raises it by more than the margin
        cost = fresh.finish_cost(state)
        rises = [
            fresh.finish_cost(fresh.step(state, t)) - cost
            for t in torch.nonzero(tokens.allowed(state)).flatten().tolist()
        ]
        assert min(rises) <= -1
        assert max(rises) <= margin


def test_a_budget_too_small_is_refused(jpeg_tokenizer):
    codec, grammar = grammar_for("64")
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    stream = streams_for(codec, 1)[0]
    for state in (grammar.start, grammar.check_prefix(stream[: len(stream) // 2]), grammar.check_prefix(stream[:-1])):
        cost = tokens.finish_cost(state)
        assert cost > 0
        with pytest.raises(ValueError, match=rf"cannot be finished within {cost - 1} more id\(s\): it needs {cost}"):
            tokens.allowed(state, cost - 1)
        assert tokens.allowed(state, cost).any()
    done = grammar.check_prefix(stream)
    assert tokens.finish_cost(done) == 0
    assert tokens.allowed(done, 1).nonzero().flatten().tolist() == [EOS_ID]
    no_ff = [None] * NUM_SPECIAL + [bytes([b]) for b in range(255)]
    with pytest.raises(ValueError, match="every single byte"):
        TokenGrammar(grammar, no_ff, EOS_ID, 300).finish_cost(grammar.start)


# ---------------------------------------------------------------------- the table-driven fast paths


def reference_advance(grammar: JpegGrammar, state: State, data: bytes) -> State | None:
    """``advance`` by the bit-by-bit reference decoder (``_step_byte`` with the context, one byte at a time)."""
    local, mcus = state
    for byte in data:
        moved = grammar._step_byte(local, grammar._ctx[mcus], byte)
        if moved is None:
            return None
        local, mcus = moved[0], mcus + moved[1]
    return State(local, mcus)


def reference_mask(tokens: TokenGrammar, state: State) -> list[int]:
    """The allowed ids of ``state`` by the reference decoder, one piece at a time (no trie, no tables, no cache)."""
    if tokens.grammar.finished(state):
        return [tokens.eos_id]
    return [i for i, p in enumerate(tokens.pieces) if p and reference_advance(tokens.grammar, state, p) is not None]


def assorted_states(tokens: TokenGrammar, rng: random.Random, count: int) -> list[State]:
    """States of every kind: prefixes of real streams (header, data, stuffing, markers, the end) and of uniform
    walks under the masks (data no photo has: long runs, coefficients near 63, every Huffman code)."""
    grammar = tokens.grammar
    states = [s for _ in range(2) for s in walk(tokens, rng)[1]]
    budget = tokens.finish_cost(grammar.start) + 3
    states += [s for s, _ in budget_walk(tokens, rng, budget)[1]]
    for stream in streams_for(tokens.grammar.codec, 2):
        state = grammar.start
        for offset, byte in enumerate(stream):
            if offset % 7 == 0 or byte in (0x00, 0xFF) or offset > len(stream) - 6:
                states.append(state)
            state = grammar.advance(state, bytes([byte]))
        states.append(state)
    return rng.sample(states, min(count, len(states)))


@pytest.mark.parametrize("name", ["64", "64-r3", "64-444-r16", "64-422-r4"])
def test_table_driven_moves_equal_the_bit_by_bit_reference(jpeg_tokenizer, name):
    """Every byte from every kind of state: the move tables (bit pairs, nibble rows, byte rows, single moves, moves
    in a context) give what the reference decoder gives, on fresh grammars (rows and moves not yet built)."""
    codec, _ = grammar_for(name)
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    rng = random.Random(name)
    states = assorted_states(tokens, rng, 120)
    contexts = sorted(set(tokens.grammar._ctx) | {(n, 0xD0 + n % 8) for n in range(1, 9)})
    for grammar in (JpegGrammar(codec), JpegGrammar(codec)):
        for state in states:
            row = grammar._row(state.local) if rng.random() < 0.5 else None
            for byte in range(256):
                expected = grammar._step_byte(state.local, None, byte)  # (local, 0), None or _CTX
                expected = _NO if expected is None else expected if expected == _CTX else expected[0]
                assert grammar._byte_move(state.local, byte) == expected, (grammar.unpack(state), byte)
                assert row is None or row[byte] == expected, (grammar.unpack(state), byte)
                if expected == _CTX:
                    for ctx in contexts:
                        assert grammar._ctx_byte(state.local, ctx, byte) == grammar._step_byte(state.local, ctx, byte)


@pytest.mark.parametrize("name", ["64", "64-444-r16", "64-422-r4"])
def test_the_bulk_bit_tables_equal_their_one_state_definitions(name):
    """Every bit move and cheapest bit built in bulk (once per block layout) is what one state's computation gives."""
    codec, grammar = grammar_for(name)
    finisher = grammar._finisher()
    assert len(grammar._pairs) > 25_000
    assert len(finisher._choices) > 25_000
    for bits, pair in grammar._pairs.items():
        fields = grammar._unpack(bits)[1:5]
        assert pair == (grammar._bit(*fields, 0), grammar._bit(*fields, 1)), fields
        assert bits not in finisher._choices or finisher._choices[bits] == finisher._bit(*fields)[0], fields
    assert JpegGrammar(codec)._pairs is grammar._pairs  # shared by grammars of the same layout


@pytest.mark.parametrize(("pieces", "name"), [("tokenizer", "64"), ("crossing", "64"), ("crossing", "64-r3")])
def test_masks_and_single_id_checks_equal_the_reference(jpeg_tokenizer, pieces, name):
    """The trie walk's masks equal the reference decoder's, piece by piece, from a fresh grammar; ``allows`` (one id,
    no mask) equals the mask's entry for every id, with no budget and with budgets from the tightest to ample."""
    codec, grammar = grammar_for(name)
    rng = random.Random(pieces + name)
    if pieces == "tokenizer":
        tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    else:
        tokens = TokenGrammar(grammar, _marker_crossing_pieces(streams_for(codec), rng), EOS_ID, 600)
    states = assorted_states(tokens, rng, 60)
    fresh = TokenGrammar(JpegGrammar(codec), tokens.pieces, EOS_ID, tokens.num_ids)
    margin = fresh.fast_margin
    for state in states:
        assert torch.nonzero(fresh.allowed(state)).flatten().tolist() == sorted(reference_mask(fresh, state))
        cost = fresh.finish_cost(state)
        for budget in (None, cost, cost + 1, cost + margin, cost + margin + 1, cost + 40):
            mask = fresh.allowed(state, budget).tolist()
            checks = [fresh.allows(state, token, budget) for token in range(fresh.num_ids)]
            assert checks == mask, (grammar.unpack(state), budget)
    with pytest.raises(ValueError, match="cannot be finished"):
        fresh.allows(grammar.start, 100, fresh.finish_cost(grammar.start) - 1)


@pytest.mark.parametrize("name", ["64", "64-444-r16", "256"])
def test_the_finish_bound_is_an_upper_bound(jpeg_tokenizer, name):
    """The walk-free bound that lets an ample budget skip finish_cost is never below it (no restart markers at 256)."""
    codec, _ = grammar_for(name)
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    finisher = tokens.grammar._finisher()
    states = assorted_states(tokens, random.Random(name), 400) if codec.size == 64 else []
    stream = streams_for(codec, 1)[0]
    states += [tokens.grammar.check_prefix(stream[:cut]) for cut in range(0, len(stream), 97)]
    for state in states:
        assert finisher.bound(state) >= finisher.cost(state), tokens.grammar.unpack(state)


def _sampler(tokens: TokenGrammar, temperature: float, rows: int, seed: int) -> tuple[_Sampler, list[torch.Generator]]:
    generators = [torch.Generator().manual_seed(seed + r) for r in range(rows)]
    return _Sampler(temperature, None, 1.0, generators, tokens.num_ids, GrammarConstraint(tokens, skip=0)), generators


def test_lazy_draws_follow_the_masked_distribution_exactly(jpeg_tokenizer):
    """Draws that ask the grammar about the drawn id alone (and build a mask only after refusals) have the law of
    draws under the mask: here the refused ids hold 98% of the mass, so most rows exhaust their tries and draw
    under the mask, others keep a later try. Greedy is the masked argmax; seeds reproduce the ids."""
    codec, grammar = grammar_for("64")
    tokens = TokenGrammar.for_tokenizer(codec, jpeg_tokenizer)
    ids = jpeg_tokenizer.encode(streams_for(codec, 1)[0])
    prefix = ids[: len(ids) // 2]
    state = grammar.start
    for token in prefix:
        state = tokens.step(state, token)
    allowed = torch.nonzero(tokens.allowed(state)).flatten().tolist()
    refused = [t for t in range(NUM_SPECIAL, tokens.num_ids) if t not in allowed]
    assert len(allowed) > 5, grammar.expected(state)
    assert len(refused) > 5, grammar.expected(state)
    logits = torch.full((tokens.num_ids,), float("-inf"))
    favoured = allowed[:4]
    logits[favoured] = torch.tensor([1.0, 0.0, -0.5, -1.0])
    logits[refused[:12]] = 3.0
    rows = 3000
    sampler, _ = _sampler(tokens, 1.0, rows, seed=0)
    sequences = [list(prefix) for _ in range(rows)]
    drawn = sampler(logits.expand(rows, -1).clone(), list(range(rows)), sequences, [10**6] * rows).tolist()
    expected = torch.softmax(logits[favoured], dim=0).tolist()
    assert set(drawn) <= set(favoured)
    for token, p in zip(favoured, expected, strict=True):
        assert abs(drawn.count(token) / rows - p) < 4.5 * (p * (1 - p) / rows) ** 0.5 + 1e-3, (token, p)
    again, _ = _sampler(tokens, 1.0, rows, seed=0)
    assert again(logits.expand(rows, -1).clone(), list(range(rows)), sequences, [10**6] * rows).tolist() == drawn
    noise = torch.randn(8, tokens.num_ids, generator=torch.Generator().manual_seed(1)) * 3
    greedy, _ = _sampler(tokens, 0.0, 8, seed=0)
    picks = greedy(noise, list(range(8)), [list(prefix) for _ in range(8)], [10**6] * 8)
    assert picks.tolist() == noise.masked_fill(~tokens.allowed(state), float("-inf")).argmax(dim=-1).tolist()
