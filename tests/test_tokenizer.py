import json
import re

import numpy as np
import pytest

from jpeglm.errors import UserError
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, NUM_SPECIAL, SPECIAL_TOKENS, CodecTokenizer, _build

RST = re.compile(rb"\xff[\xd0-\xd7]")
START_CODE = re.compile(rb"\x00\x00\x00?\x01")


def fuzz_strings(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    cases = [b"", bytes(range(256)), bytes(range(255, -1, -1)) * 3, b"\x00" * 50, b"\xff" * 50, b" " * 9]
    cases += ["<｜bos｜> <｜eos｜>".encode(), b"<|bos|>", "héllo wörld ✓ 🙂\r\n\t".encode()]
    cases += [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 3000, 200)]
    cases += [bytes(rng.choice([0, 1, 0xFF, 0xD0, 0xD7, 0x20], int(n))) for n in rng.integers(1, 500, 50)]
    return cases


@pytest.fixture(scope="module")
def text_tokenizer() -> CodecTokenizer:
    corpus = ["The quick brown fox jumps over the lazy dog. " * 20, "Größe, naïve café — 東京 🙂 " * 20] * 5
    return CodecTokenizer.train([t.encode() for t in corpus], "text", 400)


@pytest.fixture(scope="module")
def avc_tokenizer() -> CodecTokenizer:
    rng = np.random.default_rng(3)
    return CodecTokenizer.train([_annexb(rng) for _ in range(20)], "avc", 300)


def _annexb(rng: np.random.Generator) -> bytes:
    """A byte stream shaped like H.264 Annex-B: 3- and 4-byte start codes before skewed payloads."""
    nals = []
    for i in range(60):
        payload = bytes(rng.choice([0x9A, 0x21, 0xE0, 0x00, 0x40, 0x7F], int(rng.integers(3, 40))))
        payload = payload.replace(b"\x00\x00", b"\x00\x03\x00")  # emulation prevention, as in real streams
        nals.append((b"\x00\x00\x00\x01" if i % 7 == 0 else b"\x00\x00\x01") + bytes([0x41]) + payload + b"\x80")
    return b"".join(nals)


def test_lossless_on_every_byte_string(jpeg_tokenizer, text_tokenizer, avc_tokenizer, jpeg_streams):
    for tokenizer in (jpeg_tokenizer, text_tokenizer, avc_tokenizer):
        for data in fuzz_strings() + jpeg_streams[:3]:
            assert tokenizer.decode(tokenizer.encode(data)) == data
        batch = fuzz_strings(1)[:50]
        assert [tokenizer.decode(ids) for ids in tokenizer.encode_batch(batch)] == batch


def test_no_byte_sequence_becomes_a_special_token(jpeg_tokenizer, text_tokenizer):
    for tokenizer in (jpeg_tokenizer, text_tokenizer):
        for data in fuzz_strings(2) + [token.encode() for token in SPECIAL_TOKENS]:
            assert min(tokenizer.encode(data), default=NUM_SPECIAL) >= NUM_SPECIAL


def test_id_layout(jpeg_tokenizer):
    assert jpeg_tokenizer.vocab_size == 320
    assert jpeg_tokenizer.num_ids == 328
    for i, token in enumerate(SPECIAL_TOKENS):
        assert jpeg_tokenizer.tokenizer.token_to_id(token) == i
    for b in range(256):
        assert jpeg_tokenizer.encode(bytes([b])) == [NUM_SPECIAL + b]
        assert jpeg_tokenizer.token_bytes(NUM_SPECIAL + b) == bytes([b])
    merged = [jpeg_tokenizer.token_bytes(i) for i in range(NUM_SPECIAL + 256, jpeg_tokenizer.num_ids)]
    assert all(len(m) >= 2 for m in merged)
    assert len(set(merged)) == len(merged)


def test_special_tokens_frame_a_sample(jpeg_tokenizer, text_tokenizer, jpeg_streams):
    stream = jpeg_streams[0]
    ids = jpeg_tokenizer.encode(stream, add_special_tokens=True)
    assert ids[:2] == [BOS_ID, MODALITIES["jpeg"]]
    assert ids[-1] == EOS_ID
    assert ids[2:-1] == jpeg_tokenizer.encode(stream)
    assert jpeg_tokenizer.decode(ids) == stream  # special ids are dropped
    assert text_tokenizer.encode(b"hi", add_special_tokens=True)[:2] == [BOS_ID, MODALITIES["text"]]
    batch = jpeg_tokenizer.encode_batch(jpeg_streams[:2], add_special_tokens=True)
    assert batch[0] == ids


def test_bpe_compresses_jpeg_a_little(jpeg_tokenizer, jpeg_streams):
    ratio = sum(len(jpeg_tokenizer.encode(s)) for s in jpeg_streams) / sum(len(s) for s in jpeg_streams)
    # Entropy-coded bytes are near-random: the paper's 320-symbol BPE saves only about 10%.
    assert 0.75 < ratio < 0.97


def test_jpeg_prompt_tokens_are_a_prefix_at_every_restart_marker(jpeg_tokenizer, jpeg_codec, jpeg_streams):
    for stream in jpeg_streams[:6]:
        full = jpeg_tokenizer.encode(stream)
        for match in RST.finditer(stream):
            prefix = jpeg_tokenizer.encode(stream[: match.end()])
            assert full[: len(prefix)] == prefix
        for ratio in (0.25, 0.5, 0.75):
            prompt = jpeg_tokenizer.encode(jpeg_codec.prompt(stream, ratio))
            assert full[: len(prompt)] == prompt


def test_avc_prefix_stable_before_every_start_code(avc_tokenizer):
    stream = _annexb(np.random.default_rng(11))
    full = avc_tokenizer.encode(stream)
    cuts = [m.start() for m in START_CODE.finditer(stream)]
    assert len(cuts) == 60
    for cut in cuts:
        prefix = avc_tokenizer.encode(stream[:cut])
        assert full[: len(prefix)] == prefix


def test_shift_moves_only_bpe_ids(jpeg_tokenizer):
    ids = np.array([BOS_ID, 3, 8, 300, EOS_ID])
    assert jpeg_tokenizer.shift(ids, 1000).tolist() == [BOS_ID, 3, 1008, 1300, EOS_ID]


def test_decode_drops_ids_outside_the_vocabulary(jpeg_tokenizer):
    assert jpeg_tokenizer.decode([8 + 65, 99999, -1, 0, 8 + 66]) == b"AB"
    assert jpeg_tokenizer.decode(np.array([[8 + 65], [8 + 66]])) == b"AB"


def test_save_load_round_trip(jpeg_tokenizer, jpeg_streams, tmp_path):
    jpeg_tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "codec_spec.json",
        "id_layout.json",
        "tokenizer.json",
    ]
    layout = json.loads((tmp_path / "tok" / "id_layout.json").read_text())
    assert layout["modality"] == "jpeg"
    assert layout["special_tokens"]["<｜bos｜>"] == BOS_ID
    loaded = CodecTokenizer.load(tmp_path / "tok")
    assert loaded.modality == "jpeg"
    assert loaded.num_ids == jpeg_tokenizer.num_ids
    assert loaded.codec_spec == jpeg_tokenizer.codec_spec
    assert loaded.codec.spec == jpeg_tokenizer.codec_spec
    for stream in jpeg_streams[:3]:
        assert loaded.encode(stream) == jpeg_tokenizer.encode(stream)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="not a jpeglm tokenizer directory"):
        CodecTokenizer.load(tmp_path)


def test_training_is_deterministic(jpeg_streams):
    a = CodecTokenizer.train(jpeg_streams, "jpeg", 300)
    b = CodecTokenizer.train(jpeg_streams, "jpeg", 300)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()


def test_train_arguments_are_checked(jpeg_streams):
    with pytest.raises(ValueError, match=">= 256"):
        CodecTokenizer.train(jpeg_streams, "jpeg", 100)
    with pytest.raises(ValueError, match="modality"):
        CodecTokenizer.train(jpeg_streams, "audio", 300)


def test_jpeg_encoding_skips_the_marker_cut_only_where_the_merges_cannot_cross_it(jpeg_tokenizer, jpeg_streams):
    """The cut at restart markers is skipped for speed when no merge can join across a marker (the same ids), and
    kept for a merge list that could: here a merge of the marker byte D0 with the byte after it."""
    cut = jpeg_tokenizer.tokenizer  # as saved: with the Split pre-tokenizer
    assert cut.pre_tokenizer is not None
    assert jpeg_tokenizer._encoder.pre_tokenizer is None
    streams = jpeg_streams + fuzz_strings(1)
    texts = [s.decode("latin-1") for s in streams]
    assert jpeg_tokenizer.encode_batch(streams) == [e.ids for e in cut.encode_batch(texts, add_special_tokens=False)]
    assert [jpeg_tokenizer.encode(s, add_special_tokens=True) for s in streams[:3]] == [
        e.ids for e in cut.encode_batch(texts[:3], add_special_tokens=True)
    ]
    crossing = CodecTokenizer(_build([("\xd0", "A")], "jpeg"), "jpeg")  # "Ð" + "A" could join across FF D0
    assert crossing._encoder.pre_tokenizer is not None
    assert crossing.encode(b"\xff\xd0A") == [NUM_SPECIAL + 0xFF, NUM_SPECIAL + 0xD0, NUM_SPECIAL + ord("A")]
    inside = CodecTokenizer(_build([("\xd0", "A")], "jpeg"), "jpeg").encode(b"\x01\xd0A")  # no marker: merged
    assert inside == [NUM_SPECIAL + 1, NUM_SPECIAL + 256]
