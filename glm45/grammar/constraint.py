"""One sequence's constraint: where its output stands (thinking, answering, inside a call) and which tokens may
come next.

The output of a GLM-4.5 turn is read in phases, as the reasoning parser reads it:
- OPEN: nothing but whitespace yet, and the model may think first. Next may come whitespace, `<think>` or the
  start of the answer (the model may skip thinking; the answer grammar then starts there).
- THINK: inside `<think>…`: free text, never masked by a grammar, until `</think>` — or a `<tool_call>`, which
  ends a thought as the parser reads it. A thinking budget forces `</think>` once that many tokens are out.
  When an answer grammar is to follow, stop tokens are banned here, and so is `<tool_call>` when that grammar
  has no calls (it would start an answer that is not JSON).
- ANSWER: the answer grammar's matcher decides every token (JSON, forced calls, JSON-or-calls) until it is
  complete and a stop token is accepted (`finished`). Without one, the answer is free text, except that a
  `<tool_call>` the model opens (tool_choice "auto") starts the call grammar, which then decides every token up
  to `</tool_call>`, after which the text is free again.
Tags are found in the bytes of the output, so one spelled out over several tokens counts too; the bytes of the
same token after the tag are fed to the grammar that starts there.

Near `max_tokens` the answer (or the thought, then the answer) is closed by its shortest route (`closing.py`), so a
constrained answer always ends complete when max_tokens leaves room for one.

`restrict` writes the next token's bitmask (or says what is banned, or that nothing is); `accept` advances the
state by one sampled token; `fork` copies the state for speculative drafts (the engine advances a fork through
the MTP drafts to mask each verify position, and throws it away).

Where a call's name starts (right after a `<tool_call>` the grammar took, or the one the prompt was prefilled
with) and the grammar allows more than one declared name, `name_choices` offers each name whole — its tokens and
the newline that ends it — so that the engine can choose among them by the model's likelihood of the whole name
(`glm45.engine.name_choice`) rather than token by token.
"""

from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass

import torch

from glm45.grammar import closing

logger = logging.getLogger(__name__)

THINK_END, CALL_START = b"</think>", b"<tool_call>"
TAIL_BYTES = 16      # output bytes kept to find a tag split over tokens (longer than any tag)
MAX_LEADING_BLANKS = 4  # whitespace tokens allowed before the thought or answer opens
ROUTE_MARGIN = 16       # tokens before the end (beyond a whole answer's route) from which a complete answer ends
ROUTE_EVERY = 16        # the most output tokens between two lookups of the closing route
# No route is looked up while more tokens are left than the longest route (`closing.MAX_ROUTE`) could ever need.
ROUTE_HORIZON = closing.MAX_ROUTE + 1 + closing.MAX_ROUTE // 2


class Phase(enum.IntEnum):
    OPEN = 0
    THINK = 1
    ANSWER = 2


@dataclass(frozen=True)
class Restriction:
    """What the next token may be: `masked` — only what the bitmask row allows; else not `banned` ones."""

    masked: bool = False
    banned: tuple[int, ...] = ()


FREE = None


class SequenceConstraint:
    def __init__(self, backend, answer_grammar, call_grammar, reasoning: bool, thinking_budget: int | None = None,
                 max_tokens: int | None = None, call_names: tuple[str, ...] = (), opened_call: bool = False):
        self.backend = backend
        self.max_tokens = max_tokens  # the answer is closed (`closing.py`) before this many output tokens
        self.answer_grammar = answer_grammar
        self.call_grammar = call_grammar
        self.thinking_budget = thinking_budget
        self.phase = Phase.OPEN if reasoning else Phase.ANSWER
        self.matcher = self._matcher(answer_grammar)  # in OPEN: fresh, for the answer's first token
        self.in_call = False          # the matcher is a triggered call's
        self.num_tokens = 0           # output tokens accepted
        self.num_blanks = 0           # whitespace tokens while OPEN
        self.tail = b""
        self.finished = False         # the answer is complete and a stop token was accepted
        self.closing = False          # every token from now on is the next one of the shortest route to the end
        self.next_lookup = 0          # the output token count at which the route is looked up again
        self.route: list[int] | None = None  # that route, while the output follows it
        self.broken = False           # a token the grammar refused got through: nothing is constrained any more
        self.call_names = call_names  # the declared tools whose names `name_choices` offers whole
        # The last bytes the current matcher took (the prompt's prefilled `<tool_call>` when it ends with one).
        self.fed = CALL_START if opened_call and self.phase == Phase.ANSWER else b""
        self.fresh = answer_grammar is not None  # the matcher is the answer's and has taken nothing yet
        self._choices: tuple[int, list[list[int]] | None] | None = None  # (num_tokens, name_choices then)
        # With an answer to come, the thought may not end the turn (a stop token), nor end in a `<tool_call>` that
        # the answer's grammar cannot take.
        banned = []
        if answer_grammar is not None:
            banned += backend.stop_token_ids
            if backend.tool_call_start is not None and not _accepts(answer_grammar, "<tool_call>"):
                banned.append(backend.tool_call_start)
        self.banned_in_thought = tuple(banned)
        self._plan_closing()

    @staticmethod
    def _matcher(grammar):
        if grammar is None:
            return None
        import xgrammar

        return xgrammar.GrammarMatcher(grammar)

    def fork(self) -> SequenceConstraint:
        other = object.__new__(SequenceConstraint)
        other.__dict__.update(self.__dict__)
        other.matcher = self.matcher.fork() if self.matcher is not None else None
        return other

    # ------------------------------------------------------------------ the next token
    def restrict(self, bitmask: torch.Tensor, row: int) -> Restriction | None:
        """What the next token may be; a `masked` restriction has filled `bitmask[row]`."""
        if self.finished or self.broken:
            return FREE
        b = self.backend
        if self.phase == Phase.THINK:
            spent = self.thinking_budget is not None and self.num_tokens >= self.thinking_budget
            if spent or self._must_close_thought():
                bitmask[row] = b.only_think_end
                return Restriction(masked=True)
            return Restriction(banned=self.banned_in_thought) if self.banned_in_thought else FREE
        if self.matcher is None:
            return FREE
        if self.closing and self.route:
            bitmask[row] = b.one_hot(self.route[0])
            return Restriction(masked=True)
        need = self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.phase == Phase.OPEN:
            extra = b.think_start_row if self.num_blanks >= MAX_LEADING_BLANKS else b.blank_or_think_row
            bitmask[row] |= extra
            return Restriction(masked=True)
        return Restriction(masked=True) if need else FREE

    # ------------------------------------------------------------------ a call's name, whole
    def name_choices(self) -> list[list[int]] | None:
        """Where the output stands at the start of a call's name: the tokens of each declared name followed by its
        newline that the grammar allows from here and that fit in the tokens left, when there are two or more of
        them (else None: the name is decoded token by token, as any text)."""
        if self._choices is not None and self._choices[0] == self.num_tokens:
            return self._choices[1]
        choices = None
        if self.call_names and self.phase == Phase.ANSWER and self.matcher is not None and \
                self.fed.endswith(CALL_START) and not (self.finished or self.broken or self.closing):
            left = None if self.max_tokens is None else self.max_tokens - self.num_tokens
            allowed = []
            for name in self.call_names:
                tokens = self.backend.name_tokens(name)
                if tokens not in allowed and (left is None or len(tokens) < left) and self._allows(tokens):
                    allowed.append(tokens)
            choices = allowed if len(allowed) > 1 else None
        self._choices = (self.num_tokens, choices)
        return choices

    def _allows(self, tokens: list[int]) -> bool:
        matcher = self.matcher.fork()
        return all(matcher.accept_token(token) for token in tokens)

    # ------------------------------------------------------------------ closing before max_tokens
    def _must_close(self, route_length: int | None) -> bool:
        """Whether the tokens left are only just enough for a route of `route_length` tokens."""
        if self.max_tokens is None or route_length is None:
            return False
        # with some slack: the route found greedily may grow by a few tokens when the output leaves it (a tag the
        # model starts spelling out byte by byte is finished the same way)
        return self.max_tokens - self.num_tokens <= route_length + 1 + max(4, route_length // 2)

    def _must_close_thought(self) -> bool:
        """Whether the tokens left are only just enough for `</think>` and the shortest whole answer."""
        if self.answer_grammar is None or self.max_tokens is None:
            return False
        return self._must_close(None if self._answer_route is None else self._answer_route + 1)

    @functools.cached_property
    def _answer_route(self) -> int | None:
        """Tokens of the shortest route through a whole answer (looked up once per grammar)."""
        if self.answer_grammar is None or self.max_tokens is None:
            return None
        return self.backend.answer_route(self.answer_grammar)

    def _plan_closing(self) -> None:
        """Whether the next token is the next one of the shortest route to the end of the grammar (`closing`, with
        the route in `route`), once the tokens left call for it. Called as the state reaches each position
        (construction, `accept`), never from `restrict`, so that the decision depends on the tokens alone, not on
        which copy was asked when: MTP verification asks forks.

        A route is looked up only within `ROUTE_HORIZON` tokens of the end, and then again once the tokens left
        beyond what closing by it needs (its cushion) could run out: after a quarter of the cushion, at most every
        `ROUTE_EVERY` tokens (a route seldom grows by more than a token per token written: opening a structure). A
        route is kept while the output follows it."""
        if self.finished or self.broken or self.phase == Phase.THINK or self.matcher is None:
            return
        if self.max_tokens is None:
            return
        if self.closing:
            if self.route is None:  # the output left the route (a tag spelled out byte by byte): a new one from here
                self.route = self.backend.shortest_route(self.matcher)
            return
        left = self.max_tokens - self.num_tokens
        if left > ROUTE_HORIZON:
            return
        # Where the answer could end now (its shortest route is a stop token), it ends unless another whole answer's
        # worth of tokens remains: a further call (or item) begun now could not be closed in time.
        if left <= (self._answer_route or 0) + ROUTE_MARGIN and self.matcher.is_completed():
            self.closing, self.route = True, [self.backend.stop_token_ids[0]]
            return
        if self.route is not None:
            length = len(self.route)
        elif self.num_tokens < self.next_lookup:
            return
        else:
            # The route from the first closing order is a route, so the shortest is no longer: when even it leaves
            # room, so does the shortest, and the routes from the other orders need not be walked. It is not kept.
            if self.fresh and self._answer_route is not None:  # the answer's start: its shortest route is known
                bound = self._answer_route
            else:
                route = self.backend.shortest_route(self.matcher, num_starts=1)
                bound = None if route is None else len(route)
            if bound is not None and not self._must_close(bound):
                length = bound
            else:
                self.route = self.backend.shortest_route(self.matcher)
                if self.route is None:
                    return
                length = len(self.route)
        if self._must_close(length):
            self.closing = True
            return
        cushion = left - (length + 1 + max(4, length // 2))
        self.next_lookup = self.num_tokens + max(1, min(ROUTE_EVERY, cushion // 4))

    # ------------------------------------------------------------------ advancing
    def accept(self, token_id: int) -> bool:
        """Advance by one generated token; False when the constraint refused it (it is then broken)."""
        accepted = self._accept(token_id)
        self._plan_closing()
        return accepted

    def _accept(self, token_id: int) -> bool:
        if self.finished or self.broken:
            return True
        self.num_tokens += 1
        if self.route is not None:  # a route is kept only while the output follows it
            self.route = self.route[1:] if self.route[0] == token_id and len(self.route) > 1 else None
        data = self.backend.token_bytes[token_id] if token_id < len(self.backend.token_bytes) else b""
        if self.phase == Phase.OPEN and self.closing:
            self.phase = Phase.ANSWER  # the route of the answer starts here, whatever its first token
        if self.phase == Phase.OPEN:
            if token_id == self.backend.think_start:
                self.phase = Phase.THINK
                return True
            if data and not data.strip():
                self.num_blanks += 1
                return True
            self.phase = Phase.ANSWER  # the answer starts without a thought
        if self.matcher is not None and (self.phase == Phase.ANSWER or self.in_call):
            return self._advance(token_id, data)
        found = self._find_tag(data)
        if found is not None:
            tag, rest = found
            self._open(tag, rest)
        return not self.broken

    def _advance(self, token_id: int, data: bytes) -> bool:
        if not self.matcher.accept_token(token_id):
            return self._break(f"token {token_id} ({data!r}) is not allowed by the grammar")
        self.fed = (self.fed + data)[-TAIL_BYTES:]
        self.fresh = False
        if self.in_call:
            if self.matcher.is_completed():  # `</tool_call>`: free text again until the next call
                self.matcher, self.in_call, self.tail, self.fed = None, False, b"", b""
        elif self.matcher.is_terminated():
            self.finished = True
        return True

    def _find_tag(self, data: bytes) -> tuple[bytes, bytes] | None:
        """The first tag that ends in this token's bytes and changes the phase, with the bytes after it."""
        text = self.tail + data
        self.tail = text[-TAIL_BYTES:]
        tags = (THINK_END, CALL_START) if self.phase == Phase.THINK else (CALL_START,) if self.call_grammar else ()
        best = None
        for tag in tags:
            at = text.find(tag, max(0, len(text) - len(data) - len(tag) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, tag)
        if best is None:
            return None
        at, tag = best
        return tag, text[at + len(tag):]

    def _open(self, tag: bytes, rest: bytes) -> None:
        self.phase, self.tail = Phase.ANSWER, b""
        if self.answer_grammar is not None:
            self.matcher = self._matcher(self.answer_grammar)
            rest = (CALL_START + rest) if tag == CALL_START else rest
        elif tag == CALL_START and self.call_grammar is not None:
            self.matcher, self.in_call = self._matcher(self.call_grammar), True
        else:
            return
        self.fed = ((CALL_START if tag == CALL_START else b"") + rest)[-TAIL_BYTES:]
        self.fresh = not self.in_call and not rest
        if rest and not self.matcher.accept_string(rest.decode("utf-8", "replace")):
            self._break(f"the text after {tag.decode()} ({rest!r}) is not allowed by the grammar")

    def _break(self, why: str) -> bool:
        logger.warning("constrained decoding gave up on a sequence: %s", why)
        self.broken, self.matcher = True, None
        return False


def _accepts(grammar, text: str) -> bool:
    """Whether an answer of `grammar` may start with `text`."""
    import xgrammar

    return xgrammar.GrammarMatcher(grammar).accept_string(text)
