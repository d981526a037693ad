"""Closing a constrained answer before `max_tokens` runs out: a short route from a grammar state to its end.

A grammar decides what may come next, not when the answer ends: a model that keeps writing inside a JSON string
(or digits of a number, or items of an array) stays valid at every step and is cut off by `max_tokens` with an
unterminated answer. So, as a thinking budget closes a thought, the engine closes the answer: while the tokens
left are more than enough, nothing changes; once they are just enough for the shortest way out, every remaining
token is the next one of that route. The route is found greedily on a fork of the matcher — at each step the
first allowed token in `closing_order`: a stop token, else a token made only of closing characters (`"`, `}`,
`]`, or a closing tag such as `</tool_call>`), longest first, else the shortest allowed token — which closes
strings, arrays and objects and writes the required keys with the shortest values the schema allows.
"""

from __future__ import annotations

import numpy as np

from glm45.grammar import masks

PREFERRED = (b"</tool_call>", b"</arg_value>", b"</arg_key>", b'"', b"}", b"]", b":", b",", b"<arg_value>",
             b"<arg_key>", b"0")
# The same preferences with JSON's closers first: inside a JSON string a closing tag is plain text (and inside a
# raw GLM argument value, `"` is), so each order loops where the other one closes; a route that loops is dropped.
JSON_FIRST = PREFERRED[3:8] + PREFERRED[:3] + PREFERRED[8:]
LOOP = 6  # the same token this many times in a row: the order is going nowhere
MAX_ROUTE = 256  # tokens; a route not found within this is given up (the answer is then not closed early)


def closing_order(token_bytes: list[bytes], stop_token_ids: list[int], preferred=PREFERRED,
                  longest_first: bool = True) -> np.ndarray:
    """Token ids in the order the route prefers them (tokens with no text, other than stop tokens, never): stop
    tokens, the `preferred` texts, then the other tokens by length (longest first: fewer tokens for a key or an enum
    value; or shortest first: no piece that runs past a tag into the next structure, as `>\n` after `</tool_call`
    does into another call)."""
    stops = [t for t in stop_token_ids if t < len(token_bytes)]
    rank = {text: r for r, text in enumerate(preferred)}
    preferred = sorted((i for i, b in enumerate(token_bytes) if b in rank), key=lambda i: rank[token_bytes[i]])
    taken = set(stops) | set(preferred)
    sign = -1 if longest_first else 1
    rest = sorted((i for i, b in enumerate(token_bytes) if b and i not in taken),
                  key=lambda i: sign * len(token_bytes[i]))
    return np.array(stops + preferred + rest, dtype=np.int64)


def shortest_route(matcher, orders: list[np.ndarray], stop_token_ids: set[int], vocab_size: int,
                   limit: int = MAX_ROUTE, num_starts: int | None = None) -> list[int] | None:
    """Tokens from the matcher's state to the end of its grammar, a stop token last (None: none found): the shortest
    of the routes found starting from each of `orders` (or the first `num_starts` of them; each given up once no
    shorter than the best so far). A route switches to the next order where its own goes round in circles (`"`
    inside a raw argument value, a closing tag inside a JSON string)."""
    best = None
    for start in range(num_starts or len(orders)):
        rotated = orders[start:] + orders[:start]
        route = _route(matcher, rotated, stop_token_ids, vocab_size, limit if best is None else len(best) - 1)
        if route and (best is None or len(route) < len(best)):
            best = route
    return best


FAST = 24  # the first tokens of an order are tested bit by bit; the rest of the vocabulary with numpy


def _first_allowed(words: np.ndarray, order: np.ndarray, vocab_size: int) -> int | None:
    for token in order[:FAST].tolist():
        if (int(words[token >> 5]) >> (token & 31)) & 1:
            return token
    rest = order[FAST:]
    allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size][rest]
    first = int(np.argmax(allowed)) if len(rest) else 0
    return int(rest[first]) if len(rest) and allowed[first] else None


def _route(matcher, orders: list[np.ndarray], stop_token_ids: set[int], vocab_size: int,
           limit: int) -> list[int] | None:
    m = matcher.fork()
    bitmask = masks.allocate(1, vocab_size)
    words = bitmask[0].numpy()
    route: list[int] = []
    current = 0
    for _ in range(limit):
        m.fill_next_token_bitmask(bitmask, 0)
        token = _first_allowed(words, orders[current], vocab_size)
        # the same token over and over: this order is going round in circles here, so the next one takes over
        if token is not None and len(route) >= LOOP and all(t == token for t in route[-LOOP:]):
            current = (current + 1) % len(orders)
            token = _first_allowed(words, orders[current], vocab_size)
            if token == route[-1]:
                return None
        if token is None:
            return None
        route.append(token)
        if token in stop_token_ids or not m.accept_token(token):
            return route if token in stop_token_ids else None
    return None
