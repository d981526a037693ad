"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, reference counted, with a prefix cache.

The memory itself is the model runner's (`model_runner.py`: one tensor per cache, `[layers, 2 (k, v),
num_blocks, block_size, kv_heads, head_dim]`). A sequence owns a `block_table` (block ids in order); token
position p lives in slot `block_table[p // B] * B + p % B`.

Prefix cache: once a block is full of computed tokens it gets a hash chained from the previous block's
hash and its own token ids (the first from the sequence's `cache_salt`: its LoRA adapter, whose K/V differ), so
equal hashes mean equal prefixes. With MTP the blocks also hold the MTP layer's K/V, and the MTP pair at a
block's last position p is (h_p, x_{p+1}): there the token after the block is hashed with it, and the block is
registered once the MTP layer has run over that pair (the executor's `propose_drafts`). A new sequence looks
its prompt's full blocks up and shares the hits (reference count + 1). Freed blocks keep their hash and go to
the back of the free list, so a popular prefix survives until its blocks are actually reused (LRU).

Below block granularity (as SGLang's radix cache): every hashed block, and the partly valid last block a sequence
leaves when it is freed, is listed as a continuation of the prefix before it, with the tokens its K/V is valid
for. After its full-block hits a new sequence looks among the free continuations of its prefix for the one whose
tokens share the longest start with its own, and takes that block over (it owns it from then on and writes past
the shared tokens), so a repeated prompt, or one that goes on from where an earlier one stopped mid-block,
computes only its new tokens rather than up to a block of them again. A continuation in use by another sequence is
not taken (no block is ever written by two), nor a full one the sequence departs from inside it (that would
destroy a cached prefix to save part of a block).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from glm45.engine.sequence import Sequence

logger = logging.getLogger(__name__)

CONTINUATIONS_SEARCHED = 16  # the most recent continuations of a prefix compared token by token at admission


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: list[int] = field(default_factory=list)
    parent: bytes | None = None  # while listed as a continuation: the key of the prefix before the block
    listed: bool = False


def chain_hash(previous: bytes | None, token_ids: list[int]) -> bytes:
    """A block's key: the previous block's key and its tokens (as 64-bit integers: a fifth of the cost of text)."""
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, mtp: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.mtp = mtp  # blocks also hold the MTP layer's K/V, which depends on the token after the block too
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in the order they were freed (the least recently used first, so cached contents live
        # longest); an ordered dict so that a prefix hit takes a block out of the middle in O(1).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        # Per sequence: how many of its leading blocks are hashed (full and registered in the cache), and how many of
        # its leading positions hold valid K/V (the MTP layer's included), as last known.
        self.num_hashed_blocks: dict[int, int] = {}
        self.num_valid_tokens: dict[int, int] = {}
        # The key of a prefix → the blocks that continue it (hashed ones, and the partly valid last blocks of freed
        # sequences), the most recently listed last.
        self.continuations: dict[bytes | None, dict[int, None]] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0     # of which found in the cache

    # ------------------------------------------------------------------ accounting
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocation
    def _take_free_block(self, block_id: int | None = None) -> int:
        """A free block for a sequence to write: the least recently used one, or `block_id`."""
        if block_id is None:
            block_id, _ = self.free_block_ids.popitem(last=False)
        else:
            del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        self._forget(block)  # its old contents are about to be overwritten (a taken-over one's past its shared start)
        block.ref_count = 1
        return block_id

    def _forget(self, block: Block) -> None:
        """Take a block out of the prefix cache (both indexes)."""
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        self._unlist(block)
        block.hash, block.token_ids = None, []

    def _list(self, block: Block, parent: bytes | None, tokens: list[int]) -> None:
        """List a block as a continuation of the prefix keyed `parent`, its K/V valid for `tokens`."""
        self._unlist(block)
        block.token_ids, block.parent, block.listed = tokens, parent, True
        self.continuations.setdefault(parent, {})[block.block_id] = None

    def _unlist(self, block: Block) -> None:
        if block.listed:
            siblings = self.continuations[block.parent]
            del siblings[block.block_id]
            if not siblings:
                del self.continuations[block.parent]
        block.parent, block.listed = None, False

    def _best_continuation(self, parent: bytes | None, tokens: list[int], limit: int) -> tuple[int | None, int]:
        """The free block continuing prefix `parent` whose valid tokens share the longest start with `tokens` →
        (its id, how many of its positions are usable, at most `limit`); (None, 0) when none is."""
        best, best_usable = None, 0
        candidates = self.continuations.get(parent, {})
        for block_id in itertools.islice(reversed(candidates), CONTINUATIONS_SEARCHED):
            block = self.blocks[block_id]
            if block.ref_count:
                continue
            common = 0
            for mine, theirs in zip(tokens, block.token_ids, strict=False):  # up to the shorter
                if mine != theirs:
                    break
                common += 1
            if block.hash is not None and common < min(len(tokens), len(block.token_ids)):
                continue  # a full cached prefix that this sequence leaves inside the block: it would overwrite it
            # with MTP the K/V at a position also depends on the token after it (see `_block_tokens`)
            usable = min(common - self.mtp, limit)
            if usable > best_usable:
                best, best_usable = block_id, usable
        return best, best_usable

    def match_prefix(self, seq: Sequence) -> None:
        """At admission: share the cached blocks of the sequence's longest cached prefix, then take over the free
        continuation after them that shares most of its tokens (`_best_continuation`). At least the last known token
        is always left to compute, so its logits exist and no shared block is written."""
        assert not seq.block_table
        self.num_hashed_blocks[seq.seq_id] = 0
        if not self.enable_prefix_caching:
            return
        self.prefix_queries += seq.num_prompt_tokens
        previous = seq.cache_salt
        max_blocks = (len(seq) - 1) // self.block_size
        # Prompt log-probabilities come from the logits at every prompt position, which a cached block skips: a
        # request still missing some shares only the blocks before them (those before `prompt_logprobs_from`,
        # and after a preemption those whose log-probabilities it already has).
        if seq.num_prompt_logprobs_done < seq.num_prompt_tokens:
            max_blocks = min(max_blocks, (seq.num_prompt_logprobs_done - 1) // self.block_size)
        matched = []
        for index in range(max_blocks):  # with MTP the token after block max_blocks - 1 exists: it is known
            tokens = self._block_tokens(seq, index)
            block_hash = chain_hash(previous, tokens)
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
            previous = block_hash
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        hits = len(seq.block_table)
        self.num_hashed_blocks[seq.seq_id] = hits
        start = hits * self.block_size
        limit = len(seq) - 1 - start
        if seq.num_prompt_logprobs_done < seq.num_prompt_tokens:
            limit = min(limit, seq.num_prompt_logprobs_done - 1 - start)
        taken, usable = self._best_continuation(previous, seq.token_ids[start:start + self.block_size + self.mtp],
                                                limit) if limit > 0 else (None, 0)
        if taken is not None:
            seq.block_table.append(self._take_free_block(taken))
        seq.num_computed_tokens = seq.num_cached_tokens = start + usable
        self.num_valid_tokens[seq.seq_id] = seq.num_computed_tokens
        self.prefix_hits += min(seq.num_cached_tokens, seq.num_prompt_tokens)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the sequence's block table to hold `num_tokens` slots (caller checked `can_allocate`)."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Give the sequence's blocks back; the partly valid block after its hashed ones stays in the prefix cache
        as a continuation (reused only while it is not taken for something else)."""
        hashed = self.num_hashed_blocks.get(seq.seq_id, 0)
        valid = self.num_valid_tokens.pop(seq.seq_id, 0) - hashed * self.block_size
        if self.enable_prefix_caching and hashed < len(seq.block_table) and valid > 0:
            block = self.blocks[seq.block_table[hashed]]
            if block.ref_count == 1 and block.hash is None:
                parent = self.blocks[seq.block_table[hashed - 1]].hash if hashed else seq.cache_salt
                start = hashed * self.block_size
                self._list(block, parent, seq.token_ids[start:start + min(valid, self.block_size) + self.mtp])
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        self.num_hashed_blocks.pop(seq.seq_id, None)

    def _block_tokens(self, seq: Sequence, index: int) -> list[int]:
        """The tokens a block's contents depend on: its own, and with MTP the one after it."""
        return seq.token_ids[index * self.block_size:(index + 1) * self.block_size + self.mtp]

    def register_computed_blocks(self, seq: Sequence, computed: int | None = None) -> None:
        """Hash the sequence's blocks that became full of computed tokens, so later requests can share them.
        `computed`: how many leading positions hold valid K/V, the MTP layer's included (with MTP the caller
        says, after the MTP layer ran; without, the sequence's computed tokens)."""
        if not self.enable_prefix_caching or (self.mtp and computed is None):
            return
        computed = seq.num_computed_tokens if computed is None else computed
        self.num_valid_tokens[seq.seq_id] = computed
        hashed = self.num_hashed_blocks.get(seq.seq_id, 0)
        full = min(computed // self.block_size, len(seq.block_table), (len(seq) - self.mtp) // self.block_size)
        previous = self.blocks[seq.block_table[hashed - 1]].hash if hashed else seq.cache_salt
        for index in range(hashed, full):
            tokens = self._block_tokens(seq, index)
            block = self.blocks[seq.block_table[index]]
            block.hash = chain_hash(previous, tokens)
            self._list(block, previous, tokens)
            self.hash_to_block.setdefault(block.hash, block.block_id)
            previous = block.hash
        self.num_hashed_blocks[seq.seq_id] = max(hashed, full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (their K/V no longer match the weights); blocks in use stay allocated."""
        self.hash_to_block.clear()
        self.continuations.clear()
        for block in self.blocks:
            block.hash, block.token_ids, block.parent, block.listed = None, [], None, False
        self.num_hashed_blocks = dict.fromkeys(self.num_hashed_blocks, 0)
        self.num_valid_tokens = dict.fromkeys(self.num_valid_tokens, 0)

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq: Sequence, start: int, count: int) -> list[int]:
        return [self.slot(seq, p) for p in range(start, start + count)]
