"""The bundled model's spelling stage (recipes/glm45-tiny): its conversations show capitalised requests to tools and
lowercase drills, decline tool requests asked without tools, and keep the evaluation's held-out words unseen."""

import collections
import json
import re

from glm45_tiny.spelling_recipe import MIX, build
from glm45_tiny.synthetic import _HELDOUT_WORDS

from glm45.config import bundled_model_path


def test_spelling_conversations_mix_the_kinds_and_keep_held_out_words_unseen(tmp_path):
    path = build(tmp_path, str(bundled_model_path()), 400, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [json.loads(line) for line in build(tmp_path / "again", str(bundled_model_path()), 400, 3)
                    .read_text().splitlines()]
    assert len(rows) == 400
    users = [next(m for m in r["messages"] if m["role"] == "user")["content"] for r in rows]
    kinds = collections.Counter()
    for row, user in zip(rows, users, strict=True):
        first = next(m for m in row["messages"] if m["role"] == "assistant")
        if row["meta"]["kind"] == "no_tools":
            kinds["no_tools"] += 1
            assert row["tools"] is None and "tool_calls" not in first and "tool" in first["content"]
        elif user.split(":")[0] in ("Write in lowercase", "Lowercase", "Make this lowercase",
                                    "Please write this in lowercase"):
            kinds["lowercase"] += 1
            words = user.split(": ", 1)[1]
            assert words.split() == [w.capitalize() for w in words.lower().split()]
            assert first["content"] == words.lower()
        elif "call" in row["meta"]:
            verb = row["meta"]["call"]["name"].split("_")[0]
            kinds["capitalised" if user.startswith(verb.capitalize() + " ") else "lowercase tools"] += 1
    # The training mix has capitalised requests of its own (a quarter of its random-tool tasks).
    assert kinds["no_tools"] == round(400 * MIX["no_tools"]) and kinds["lowercase"] == round(400 * MIX["lowercase"])
    assert kinds["capitalised"] >= round(400 * MIX["capitalised_tools"])
    text = " ".join(str(r) for r in rows).lower()
    assert not any(re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", text) for word in _HELDOUT_WORDS)
