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
MAX_ROUTE = 256  # tokens; a route not found within this is given up (the answer is then not closed early)


def closing_order(token_bytes: list[bytes], stop_token_ids: list[int]) -> np.ndarray:
    """Token ids in the order the route prefers them (tokens with no text, other than stop tokens, never)."""
    stops = [t for t in stop_token_ids if t < len(token_bytes)]
    rank = {text: r for r, text in enumerate(PREFERRED)}
    preferred = sorted((i for i, b in enumerate(token_bytes) if b in rank), key=lambda i: rank[token_bytes[i]])
    taken = set(stops) | set(preferred)
    rest = sorted((i for i, b in enumerate(token_bytes) if b and i not in taken), key=lambda i: -len(token_bytes[i]))
    return np.array(stops + preferred + rest, dtype=np.int64)


def shortest_route(matcher, order: np.ndarray, stop_token_ids: set[int], vocab_size: int,
                   limit: int = MAX_ROUTE) -> list[int] | None:
    """Tokens from the matcher's state to the end of its grammar, a stop token last (None: none found)."""
    m = matcher.fork()
    bitmask = masks.allocate(1, vocab_size)
    route: list[int] = []
    for _ in range(limit):
        m.fill_next_token_bitmask(bitmask, 0)
        allowed = masks.allowed(bitmask, vocab_size)[0][order]
        first = int(np.argmax(allowed))
        if not allowed[first]:
            return None
        token = int(order[first])
        route.append(token)
        if token in stop_token_ids or not m.accept_token(token):
            return route if token in stop_token_ids else None
    return None
