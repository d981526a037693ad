"""Tokenizer loading, encode/decode, special tokens by text, the builder, and streaming detokenisation."""

import json
from pathlib import Path

import pytest
from glm45_tiny.tokenizer_build import COPY_SPLIT_PATTERN, GLM45_ADDED_TOKENS, build_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_fixtures import build_tiny_tokenizer

from glm45.chat import GLM45_CHAT_TEMPLATE
from glm45.tokenizer import CACHED_PIECE_CHARS, IncrementalDetokenizer, Tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/glm-4.5"
PROTOCOL_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                 "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>"]
def examples(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


def test_added_tokens_constant_matches_reference():
    path = REFERENCE / "tokenizer_config.json"
    if not path.exists():
        pytest.skip(f"reference tokenizer_config.json not found at {path}")
    decoder = json.loads(path.read_text(encoding="utf-8"))["added_tokens_decoder"]
    reference = [(v["content"], v["special"]) for _, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    assert list(GLM45_ADDED_TOKENS) == reference


def test_built_tokenizer_has_added_tokens_in_order_with_flags(tok, tok_dir):
    ids = [tok.token_to_id(text) for text, _ in GLM45_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert ids[-1] == tok.vocab_size - 1 and tok.vocab_size <= 800
    for (text, special), token_id in zip(GLM45_ADDED_TOKENS, ids, strict=True):
        assert tok.is_special(token_id) == special, text
    saved = {t["content"]: t["special"] for t in json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert saved == dict(GLM45_ADDED_TOKENS)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert {v["content"]: v["special"] for v in config["added_tokens_decoder"].values()} == dict(GLM45_ADDED_TOKENS)
    assert config["chat_template"] == GLM45_CHAT_TEMPLATE == tok.chat_template


def test_special_tokens_are_looked_up_by_text(tok):
    assert tok.eos_token_ids == [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|user|>"),
                                 tok.token_to_id("<|observation|>")]
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.token_to_id("<|no_such_token|>") is None
    with pytest.raises(ValueError, match="no token '<|no_such_token|>'"):
        tok.special_token_id("<|no_such_token|>")
    assert tok.id_to_token(tok.special_token_id("<|assistant|>")) == "<|assistant|>"


def test_encode_adds_no_bos_and_maps_tag_texts_to_single_ids(tok):
    prompt = "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"
    ids = tok.encode(prompt)
    assert ids[:3] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>"), tok.token_to_id("<|user|>")]
    assert tok.token_to_id("/nothink") in ids
    assert ids[-2:] == [tok.token_to_id("<think>"), tok.token_to_id("</think>")]
    assert tok.encode("") == []
    for tag in PROTOCOL_TAGS:
        assert tok.encode(f"x{tag}y").count(tok.token_to_id(tag)) == 1


ADDED_TEXTS = [text for text, _ in GLM45_ADDED_TOKENS]
PIECE_PARTS = list("ab xy\n\t{}\":,<>|/_-é中😀") + ["<|user", "|>", "<think", "/no", "ab " * 40]
PIECE_TEXT = st.lists(st.sampled_from(PIECE_PARTS), max_size=60).map("".join)


@examples(150)
@given(st.lists(st.one_of(PIECE_TEXT, st.sampled_from(ADDED_TEXTS)), max_size=8))
def test_encode_looks_up_long_pieces_and_gives_the_library_s_ids(tok, parts):
    """Long pieces between added tokens come from a cache: the ids are still those of one `tokenizers` call, the
    first time and when looked up, whatever stands around the pieces (half tags, other added tokens, nothing)."""
    text = "".join(parts)
    plain = tok._tok.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == plain
    assert tok.encode(text) == plain  # from the cache


def test_encode_leaves_a_huge_piece_out_of_the_cache(tok):
    """A piece longer than the cache takes is tokenized every time (a 10 MB prompt must not sit in memory)."""
    huge = "ab " * 30_000
    text = "<|system|>" + "a " * 200 + "<|user|>" + huge + "<|assistant|>"
    assert len(huge) > CACHED_PIECE_CHARS.stop
    tok._encode_piece.cache_clear()
    assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids
    assert tok._encode_piece.cache_info().currsize == 1  # the system piece only


def test_encode_caches_only_where_pieces_tokenize_alone(tok_dir, tmp_path):
    """A tokenizer whose added token strips the spaces beside it tokenizes pieces in context: no cache."""
    assert tok_dir and Tokenizer.from_pretrained(tok_dir)._added_token_split is not None
    saved = json.loads((tok_dir / "tokenizer.json").read_text())
    next(t for t in saved["added_tokens"] if t["content"] == "<|user|>")["lstrip"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    stripping = Tokenizer.from_pretrained(tmp_path)
    assert stripping._added_token_split is None
    text = "x " * 200 + " <|user|> " + "y" * 300
    assert stripping.encode(text) == stripping._tok.encode(text, add_special_tokens=False).ids
    # nor where the pre-tokenizer treats the text's start apart (a prefix space before its first word)
    saved = json.loads((tok_dir / "tokenizer.json").read_text())
    next(p for p in saved["pre_tokenizer"]["pretokenizers"] if p["type"] == "ByteLevel")["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    prefixing = Tokenizer.from_pretrained(tmp_path)
    assert prefixing._added_token_split is None
    assert prefixing.encode(text) == prefixing._tok.encode(text, add_special_tokens=False).ids


def test_decode_drops_special_tokens_and_keeps_protocol_tags(tok):
    text = ("[gMASK]<sop><|user|>\nq/nothink<|assistant|>\n<think>r</think>\n<tool_call>f\n<arg_key>k</arg_key>\n"
            "<arg_value>v</arg_value>\n</tool_call><|observation|>\n<tool_response>\nx\n</tool_response><|user|>")
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == ("\nq\n<think>r</think>\n<tool_call>f\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n"
                               "</tool_call>\n<tool_response>\nx\n</tool_response>")


def test_tokenizer_config_has_the_last_word_on_special_flags(tok_dir, tmp_path):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    for entry in config["added_tokens_decoder"].values():
        if entry["content"] == "<think>":
            entry["special"] = True
        if entry["content"] == "/nothink":
            entry["special"] = False
    config["additional_special_tokens"] = []
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok.encode("<think>a</think>/nothink")) == "a</think>/nothink"
    assert tok.chat_template is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "{{ messages }}"


def test_from_pretrained_needs_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_build_tokenizer_rejects_a_vocabulary_too_small_for_bytes(tmp_path):
    with pytest.raises(ValueError, match="at least 292"):
        build_tokenizer(["abc"], 291, tmp_path)


def test_copy_split_gives_a_word_the_same_tokens_wherever_it_stands(tmp_path):
    corpus = ["Please check the weather in Hobart, 12345 and 678.", '{"city": "Hobart", "id": 12345}'] * 50
    build_tokenizer(corpus, 400, tmp_path, COPY_SPLIT_PATTERN)
    copy_tok = Tokenizer.from_pretrained(tmp_path)
    for word in ["Hobart", "Ulaanbaatar", "12345", "verify_voucher", "Addis Ababa"]:
        alone = copy_tok.encode(word)
        # After a space, a quote or a tag the word keeps its tokens: what a model copies is what it must write.
        for before in [" ", "in ", '"', "<arg_value>"]:
            assert copy_tok.encode(before + word)[-len(alone):] == alone, (before, word)
        assert copy_tok.decode(alone) == word
    assert [copy_tok.decode([i]) for i in copy_tok.encode("2025")] == ["2", "0", "2", "5"]


def test_transformers_loads_the_built_tokenizer_identically(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    text = "[gMASK]<sop><|user|>\n北京 weather? 😀/nothink<|assistant|>\n<think>hm</think>\nIt's 26°C."
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------------
# Streaming detokenisation

EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🧑🏿‍🚀", "❤️", "🎉", "\U0001f9ea"]
multilingual = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
    | st.sampled_from(EMOJI + PROTOCOL_TAGS + ["北京", "莲藕", "Привет", "こんにちは", "안녕", "مرحبا", " ", "\n"]),
    max_size=12,
).map("".join)


def _stream(tok, ids, groups=None, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas, start = [], 0
    for size in groups or [1] * len(ids):
        if start >= len(ids):
            break
        deltas.append(detok.feed(ids[start:start + size] if size != 1 else ids[start]))
        start += size
    if start < len(ids):
        deltas.append(detok.feed(ids[start:]))
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas


@examples(150)
@given(text=multilingual)
def test_detokenizer_token_by_token_equals_decode(tok, text):
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=False) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


@examples(100)
@given(text=multilingual, data=st.data())
def test_detokenizer_in_random_groups_equals_decode(tok, text, data):
    ids = tok.encode(text)
    groups = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    deltas = _stream(tok, ids, groups)
    assert "".join(deltas) == tok.decode(ids)
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)


@examples(150)
@given(data=st.data())
def test_detokenizer_on_arbitrary_ids_equals_decode(tok, data):
    # Any id sequence, specials and broken UTF-8 included: the deltas still join to exactly decode(ids).
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


def test_detokenizer_holds_a_split_character_until_complete(tok):
    ids = tok.encode("a😀")
    byte_tokens = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in t for t in byte_tokens), "the emoji should be split over byte tokens here"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.feed(i) for i in ids]
    assert deltas[0] == "a" and deltas[-1] == "😀" and set(deltas[1:-1]) <= {""}
    detok = IncrementalDetokenizer(tok)
    assert detok.feed(ids[:-1]) == "a" and detok.finish() == "\ufffd"  # cut off mid-character


def test_detokenizer_drops_special_tokens_and_keeps_tags(tok):
    ids = tok.encode("<think>r</think>ok<|user|>")
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.feed(i) for i in ids] + [detok.finish()]
    assert "".join(deltas) == "<think>r</think>ok"
    assert deltas[0] == "<think>" and deltas[-2:] == ["", ""]
