"""The GLM-4.5 tokenizer, and detokenisation for streaming.

`Tokenizer` wraps a checkpoint's `tokenizer.json` (the `tokenizers` library) together with what
`tokenizer_config.json` adds: which added tokens are special, and the chat template. Special tokens are
always looked up by their text, never by hard-coded ids, so the same code runs the released checkpoints
and the small models we train ourselves.

Encoding splits the text at added tokens first (as the `tokenizers` library does: no piece of text is
tokenized across one), so a long piece between them, such as the system prompt and tool declarations every
request of an agent repeats, is tokenized once and then looked up.

`IncrementalDetokenizer` turns a stream of generated ids into text deltas. A byte-level BPE token can
end in the middle of a UTF-8 character, so text is released only once it decodes cleanly; deltas are
always decoded in the context of the tokens before them, so together they are exactly `decode(ids)`.
"""

from __future__ import annotations

import functools
import json
import re
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

END_OF_TURN_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
# Pieces of text between added tokens of this many characters are tokenized once, then looked up: at most
# CACHED_PIECES of them, their ids as 4-byte integers, so the cache holds a few tens of MB at worst.
CACHED_PIECE_CHARS = range(256, 65_537)
CACHED_PIECES = 256
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode with GLM-4.5's added tokens and special-token flags."""

    def __init__(self, tokenizer, config: dict | None = None):
        """`tokenizer` is a `tokenizers.Tokenizer`; `config` the parsed tokenizer_config.json, if any."""
        self._tok = tokenizer
        self.config = dict(config or {})
        self.chat_template: str | None = self.config.get("chat_template") or None

        special = {int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        # tokenizer_config.json has the last word on `special` (transformers reads it that way too);
        # entries are matched by their text, not by the ids written there.
        for entry in self.config.get("added_tokens_decoder", {}).values():
            token_id = self._tok.token_to_id(entry.get("content", ""))
            if token_id is None:
                continue
            if entry.get("special"):
                special.add(token_id)
            else:
                special.discard(token_id)
        for text in self.config.get("additional_special_tokens", []):
            token_id = self._tok.token_to_id(text if isinstance(text, str) else text.get("content", ""))
            if token_id is not None:
                special.add(token_id)
        self.special_ids: frozenset[int] = frozenset(special)
        self._added_token_split = _added_token_split(self._tok)
        self._encode_piece = functools.lru_cache(maxsize=CACHED_PIECES)(
            lambda piece: array("I", self._encode_text(piece)))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja` if present) from a folder."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {folder}; expected a Hugging Face checkpoint folder")
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if not isinstance(config.get("chat_template"), str) and (folder / "chat_template.jinja").is_file():
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")), config)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> list[str]:
        """The text of every token in the vocabulary (byte-level: "Ġ" stands for a space), added ones included."""
        return list(self._tok.get_vocab(with_added_tokens=True))

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """An upper bound on the bytes of text one token stands for, so that a text of B UTF-8 bytes (or B
        characters: a character is at least one byte) encodes to at least ⌈B / max_token_bytes⌉ tokens, and a
        prompt can be refused as too long before it is tokenized. (That every token covers at least one byte
        bounds the count from above, which is no help here.) It is the UTF-8 length of the longest piece in the
        vocabulary, which bounds a byte-level BPE token (each character of its piece stands for one byte), an
        added token (its piece is its text) and a byte-fallback token. A Unicode normalizer may shrink the text
        before it is split — at most 4× (a 4-byte character to one byte; Hangul jamo compose 3 to 1) — so the
        bound is multiplied by 4 then; None for other normalizers, which may delete text (no bound)."""
        kinds = _normalizer_kinds(json.loads(self._tok.to_str()).get("normalizer"))
        if not kinds <= {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}:
            return None
        longest = max(len(piece.encode("utf-8")) for piece in self._tok.get_vocab(with_added_tokens=True))
        return longest * (4 if kinds else 1)

    def encode(self, text: str) -> list[int]:
        """Ids for `text`. No BOS is added; special-token texts in `text` become their ids."""
        if self._added_token_split is None or len(text) < CACHED_PIECE_CHARS.start:
            return self._encode_text(text)
        # Long pieces between added tokens from the cache; the text around them in one call each.
        ids: list[int] = []
        start = position = 0  # text[start:position] is still to tokenize
        for index, piece in enumerate(self._added_token_split.split(text)):  # text, token, text, ..., text
            if index % 2 == 0 and len(piece) in CACHED_PIECE_CHARS:
                ids += self._encode_text(text[start:position])
                ids += self._encode_piece(piece)
                start = position + len(piece)
            position += len(piece)
        return ids + self._encode_text(text[start:])

    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose text is `text`, or None when the vocabulary has no such token."""
        return self._tok.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token's text (a byte-level token may hold part of a UTF-8 character); an added
        token's bytes are its text."""
        piece = self._tok.id_to_token(int(token_id)) or ""
        alphabet = _byte_level_alphabet()
        if piece and all(ch in alphabet for ch in piece):
            return bytes(alphabet[ch] for ch in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def vocab_bytes(self) -> list[bytes]:
        """`token_bytes` of every id, special tokens as b"" (they stand for no text: grammars never match them)."""
        return [b"" if i in self.special_ids else self.token_bytes(i) for i in range(self.vocab_size)]

    def special_token_id(self, text: str) -> int:
        """The id of an added token such as `<|user|>`; a `ValueError` when the tokenizer lacks it."""
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {text!r}; is this a GLM-4.5 tokenizer?")
        return token_id

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a generated turn: `<|endoftext|>`, `<|user|>`, `<|observation|>`."""
        return [self.special_token_id(text) for text in END_OF_TURN_TOKENS]

    @property
    def pad_token_id(self) -> int:
        return self.special_token_id(self.config.get("pad_token") or "<|endoftext|>")


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (which GLM-4.5's tokenizer uses): printable character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _added_token_split(tokenizer) -> re.Pattern | None:
    """A pattern splitting text at added tokens where `tokenizers` does (the longest match, leftmost first, as its
    Aho-Corasick search), capturing them; None where a piece's ids could depend on what is around it: an added
    token that strips spaces or matches whole words only, or one matched after a normalizer, or a pre-tokenizer
    that adds a prefix space to the text's first piece."""
    added = list(tokenizer.get_added_tokens_decoder().values())
    normalized = tokenizer.normalizer is not None
    if not added or any(t.single_word or t.lstrip or t.rstrip or (t.normalized and normalized) for t in added):
        return None
    if tokenizer.pre_tokenizer is not None and _adds_prefix_space(json.loads(tokenizer.pre_tokenizer.__getstate__())):
        return None
    texts = sorted({t.content for t in added}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, texts)) + ")")


def _adds_prefix_space(spec) -> bool:
    """Whether a pre-tokenizer's JSON has a part that treats the start of the text apart (a prefix space)."""
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" or spec.get("add_prefix_space"):
            return True
        return any(_adds_prefix_space(value) for value in spec.values())
    return isinstance(spec, list) and any(map(_adds_prefix_space, spec))


def _normalizer_kinds(spec: dict | None) -> set[str]:
    if spec is None:
        return set()
    if spec.get("type") == "Sequence":
        return set().union(*(_normalizer_kinds(n) for n in spec.get("normalizers", [])))
    return {spec.get("type")}


class IncrementalDetokenizer:
    """Turns generated ids, fed one at a time or in groups, into text deltas for streaming.

    Joined together, the deltas returned by `feed` and `finish` equal `tokenizer.decode(all_ids)`.
    A delta never ends inside a UTF-8 character (no stray `�`): bytes are held back until the character
    they start is complete. Special tokens are dropped when `skip_special_tokens`; `<think>`,
    `<tool_call>` and the other non-special protocol tags are kept.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # ids[prefix_offset:read_offset] were already emitted and end on a character boundary; they are
        # decoded again as context so the new ids decode exactly as they do inside the whole sequence.
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # everything emitted so far

    def feed(self, token_ids: int | Sequence[int]) -> str:
        """Add generated ids; return the text that became final."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        # One id at a time, so a group ending mid-character still releases the text before that character.
        deltas = []
        for token_id in token_ids:
            if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
                continue
            self.ids.append(int(token_id))
            deltas.append(self._emit(final=False))
        return "".join(deltas)

    def decode_all(self, token_ids: Sequence[int]) -> str:
        """What feeding `token_ids` to a fresh detokenizer, then `finish`, returns joined, in one decode."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def finish(self) -> str:
        """Release whatever is held back (an incomplete character decodes as `�`, as in `decode`)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self.ids):
            return ""
        decode = self.tokenizer.decode  # special ids were already filtered out in `feed` when skipping
        prefix_text = decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=False)
        new_text = decode(self.ids[self._prefix_offset:], skip_special_tokens=False)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""  # the last token ends mid-character: wait for the rest of its bytes
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta
