"""Block manager: exact block ids, reference counts, prefix hits and LRU eviction order."""
import pytest

from trident.engine.block_manager import NO_HIT

from .engine_fixtures import compute, make_block_manager, make_seq


def test_allocate_takes_blocks_in_order_and_accounts_exactly():
    bm = make_block_manager(num_blocks=8, block_size=4)
    seq = make_seq(10)
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10, NO_HIT)
    assert seq.block_table == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 5 and bm.free_block_ids() == [3, 4, 5, 6, 7]
    assert bm.usage == pytest.approx(3 / 8)


def test_allocate_grows_the_table_only_when_a_block_fills():
    bm = make_block_manager(block_size=4)
    seq = make_seq(4)
    bm.allocate(seq, 4, NO_HIT)
    compute(bm, seq, 4)
    seq.append_token(1)
    assert bm.num_blocks_needed(seq, 1) == 1     # position 4 starts block 2
    bm.allocate(seq, 1)
    compute(bm, seq, 1)
    seq.append_token(2)
    assert bm.num_blocks_needed(seq, 1) == 0     # position 5 is in the same block
    bm.allocate(seq, 1)
    assert seq.block_table == [0, 1]


def test_cannot_allocate_beyond_the_pool():
    bm = make_block_manager(num_blocks=2, block_size=4)
    seq = make_seq(9)
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 9, NO_HIT)
    assert bm.can_allocate(seq, 8)
    assert not bm.can_allocate(seq, 8, num_reserved=1)


def test_free_returns_uncached_blocks_to_the_front():
    bm = make_block_manager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    a, b = make_seq(8), make_seq(4)
    bm.allocate(a, 8, NO_HIT)
    bm.allocate(b, 4, NO_HIT)
    bm.free(a)
    assert a.block_table == []
    assert bm.free_block_ids() == [0, 1, 3, 4, 5]
    assert [blk.ref_count for blk in bm.blocks] == [0, 0, 1, 0, 0, 0]


def test_prefix_hit_shares_full_computed_blocks():
    bm = make_block_manager(num_blocks=8, block_size=4)
    a = make_seq(list(range(10)))
    bm.allocate(a, 10, NO_HIT)
    compute(bm, a, 10)
    assert bm.num_cached_blocks == 2      # blocks 0 and 1 are full; block 2 holds 2 tokens

    b = make_seq(list(range(8)) + [99, 98, 97])
    hit = bm.lookup_prefix(b)
    assert hit.block_ids == (0, 1) and hit.num_tokens == 8
    bm.allocate(b, b.num_tokens - hit.num_tokens, hit)
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (10 + 11, 0 + 8)    # both admissions counted


def test_prefix_lookup_needs_the_whole_chain_to_match():
    bm = make_block_manager(block_size=4)
    a = make_seq(list(range(12)))
    bm.allocate(a, 12, NO_HIT)
    compute(bm, a, 12)
    # Same second block, different first block: the chained hash must not match block 1.
    b = make_seq([50, 51, 52, 53] + list(range(4, 12)) + [0])
    assert bm.lookup_prefix(b).block_ids == ()


def test_hash_collision_is_caught_by_the_recheck():
    bm = make_block_manager(block_size=4, hash_fn=lambda parent, tokens: 0)   # every block collides
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5, NO_HIT)
    compute(bm, a, 5)
    b = make_seq([9, 9, 9, 9, 5])
    assert bm.lookup_prefix(b).block_ids == ()
    assert bm.lookup_prefix(make_seq([1, 2, 3, 4, 6])).block_ids == (0,)


def test_hits_are_capped_so_the_last_token_is_recomputed():
    bm = make_block_manager(block_size=4)
    a = make_seq(list(range(8)))
    bm.allocate(a, 8, NO_HIT)
    compute(bm, a, 8)
    assert bm.num_cached_blocks == 2
    twin = make_seq(list(range(8)))
    hit = bm.lookup_prefix(twin)
    # Only block 0: taking block 1 too would leave no token to compute, and computing the last
    # token would write into a block that `a` shares.
    assert hit.block_ids == (0,) and hit.num_tokens == 4
    bm.allocate(twin, 4, hit)
    assert twin.block_table == [0, 2]


def test_freed_cached_blocks_stay_reusable_and_revive_from_the_free_list():
    bm = make_block_manager(num_blocks=4, block_size=4)
    a = make_seq(list(range(9)))
    bm.allocate(a, 9, NO_HIT)
    compute(bm, a, 9)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # Tail freed first; the uncached block 2 goes to the front, cached ones to the back (LRU).
    assert bm.free_block_ids() == [2, 3, 1, 0]

    b = make_seq(list(range(8)) + [42])
    hit = bm.lookup_prefix(b)
    assert hit.block_ids == (0, 1)
    assert bm.can_allocate(b, 1, hit)
    bm.allocate(b, 1, hit)
    assert b.block_table == [0, 1, 2]
    assert bm.free_block_ids() == [3] and bm.num_free_blocks == 1


def test_can_allocate_counts_revived_blocks_as_taken():
    bm = make_block_manager(num_blocks=3, block_size=4)
    a = make_seq(list(range(8)))
    bm.allocate(a, 8, NO_HIT)
    compute(bm, a, 8)
    bm.free(a)
    b = make_seq(list(range(4)) + [70] * 9)     # hits block 0, then needs 3 more blocks
    hit = bm.lookup_prefix(b)
    assert hit.block_ids == (0,)
    assert bm.num_free_blocks == 3
    assert not bm.can_allocate(b, 9, hit)       # 3 fresh blocks needed, only 2 left after revival
    assert bm.can_allocate(b, 8, hit)


def test_eviction_is_least_recently_freed_first():
    bm = make_block_manager(num_blocks=4, block_size=2)
    a, b = make_seq([1, 2, 3]), make_seq([5, 6, 7])
    for seq in (a, b):
        bm.allocate(seq, 3, NO_HIT)
        compute(bm, seq, 3)
    bm.free(a)      # block 0 cached, block 1 uncached
    bm.free(b)      # block 2 cached, block 3 uncached
    assert bm.free_block_ids() == [3, 1, 0, 2]
    c = make_seq(5)
    bm.allocate(c, 5, NO_HIT)       # takes both uncached blocks, then evicts a's block 0
    assert c.block_table == [3, 1, 0]
    assert bm.lookup_prefix(make_seq([1, 2, 0])).block_ids == ()
    assert bm.lookup_prefix(make_seq([5, 6, 0])).block_ids == (2,)
    assert bm.num_cached_blocks == 1


def test_shared_block_stays_allocated_until_the_last_reference_goes():
    bm = make_block_manager(block_size=4)
    a = make_seq(list(range(6)))
    bm.allocate(a, 6, NO_HIT)
    compute(bm, a, 6)
    b = make_seq(list(range(5)))
    bm.allocate(b, 1, bm.lookup_prefix(b))
    assert b.block_table[0] == a.block_table[0] == 0
    bm.free(a)
    assert bm.blocks[0].ref_count == 1 and 0 not in bm.free_block_ids()
    bm.free(b)
    assert bm.blocks[0].ref_count == 0 and 0 in bm.free_block_ids()
    assert bm.num_free_blocks == bm.num_blocks


def test_duplicate_blocks_computed_side_by_side_register_once():
    bm = make_block_manager(block_size=4)
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    for seq in (a, b):
        bm.allocate(seq, 5, bm.lookup_prefix(seq))
    for seq in (a, b):
        compute(bm, seq, 5)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    assert bm.num_cached_blocks == 1 and bm.lookup_prefix(make_seq(list(range(5)))).block_ids == (0,)
    bm.free(a)
    bm.free(b)
    assert bm.free_block_ids()[-1] == 0     # only the registered copy sits in the LRU tail


def test_decode_blocks_are_cached_too():
    bm = make_block_manager(block_size=4)
    seq = make_seq([1, 2, 3])
    bm.allocate(seq, 3, NO_HIT)
    compute(bm, seq, 3)
    seq.append_token(4)
    seq.append_token(5)
    bm.allocate(seq, 1)
    compute(bm, seq, 1)     # position 3 computed: block 0 is now full
    assert bm.num_cached_blocks == 1
    assert bm.lookup_prefix(make_seq([1, 2, 3, 4, 9])).block_ids == (0,)


def test_prefix_caching_off_never_hits_or_counts():
    bm = make_block_manager(block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    bm.allocate(a, 9, bm.lookup_prefix(a))
    compute(bm, a, 9)
    b = make_seq(list(range(9)))
    assert bm.lookup_prefix(b) is NO_HIT
    assert bm.num_cached_blocks == 0 and (bm.prefix_queries, bm.prefix_hits) == (0, 0)


def test_double_free_is_caught():
    bm = make_block_manager()
    seq = make_seq(3)
    bm.allocate(seq, 3, NO_HIT)
    bm.free_blocks([0])
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free_blocks([0])
