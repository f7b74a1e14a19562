"""`PoolBook`, the pool's decisions (PROTOCOLS.md §6): share a connection per key while it has stream
capacity, min(100, peer max) streams each, callers arriving during set-up share it, idle eviction after the
timeout, retired connections never chosen again."""

from __future__ import annotations

from ambient.hbone.client import PoolBook, PoolKey

KEY = PoolKey("spiffe://cluster.local/ns/default/sa/sleep",
              frozenset({"spiffe://cluster.local/ns/bookinfo/sa/reviews"}), "10.244.1.5", ("10.244.2.7", 15008))
IDLE = 300.0


def book() -> PoolBook[str]:
    return PoolBook(max_streams=100, idle_timeout=IDLE)


def test_first_checkout_opens_and_the_next_ones_share_it_while_it_is_set_up() -> None:
    pool = book()
    first, new = pool.checkout(KEY, 0)
    assert new
    for _ in range(99):
        slot, new = pool.checkout(KEY, 0)
        assert (slot, new) == (first, False)
    assert first.in_use == 100
    second, new = pool.checkout(KEY, 0)  # the 101st stream needs another connection
    assert new and second is not first
    assert [s.in_use for s in pool.slots(KEY)] == [100, 1]


def test_150_streams_make_two_connections() -> None:
    pool = book()
    opened = sum(pool.checkout(KEY, 0)[1] for _ in range(150))
    assert opened == 2
    assert [s.in_use for s in pool.slots(KEY)] == [100, 50]


def test_capacity_is_the_lower_of_ours_and_the_peers() -> None:
    pool = book()
    slot, _ = pool.checkout(KEY, 0)
    pool.peer_max_streams(slot, 2)
    assert pool.checkout(KEY, 0) == (slot, False)
    assert pool.checkout(KEY, 0)[1]  # full at 2
    pool.peer_max_streams(slot, 1000)
    assert slot.capacity == 100  # never above our own cap


def test_a_released_stream_frees_room_on_the_oldest_connection() -> None:
    pool = book()
    slots = [pool.checkout(KEY, 0)[0] for _ in range(101)]
    first, second = slots[0], slots[-1]
    pool.release(first, 1)
    assert pool.checkout(KEY, 2) == (first, False)
    assert second.in_use == 1


def test_keys_differ_by_every_component() -> None:
    pool = book()
    pool.checkout(KEY, 0)
    variants = [
        PoolKey("spiffe://cluster.local/ns/default/sa/other", KEY.dst_identities, KEY.src_ip, KEY.dst),
        PoolKey(KEY.src_identity, frozenset({"spiffe://cluster.local/ns/bookinfo/sa/ratings"}), KEY.src_ip, KEY.dst),
        PoolKey(KEY.src_identity, KEY.dst_identities, "10.244.1.6", KEY.dst),
        PoolKey(KEY.src_identity, KEY.dst_identities, KEY.src_ip, ("10.244.2.8", 15008)),
    ]
    assert all(pool.checkout(key, 0)[1] for key in variants)
    same = PoolKey(KEY.src_identity, frozenset(KEY.dst_identities), KEY.src_ip, KEY.dst)
    assert not pool.checkout(same, 0)[1]  # equal keys share, whatever the order of the identities


def test_idle_connections_are_evicted_after_the_timeout_only() -> None:
    pool = book()
    slot, _ = pool.checkout(KEY, 0)
    assert pool.release(slot, 10) is True  # idle from t=10
    assert pool.evict_idle(10 + IDLE - 1) == []
    assert pool.evict_idle(10 + IDLE) == [slot]
    assert slot.retired
    assert pool.checkout(KEY, 400)[1]  # a new connection, not the evicted one


def test_a_reused_connection_is_not_idle() -> None:
    pool = book()
    slot, _ = pool.checkout(KEY, 0)
    pool.release(slot, 10)
    pool.checkout(KEY, 20)
    assert pool.evict_idle(10 + IDLE) == []
    assert pool.release(slot, 30) is True
    assert pool.evict_idle(30 + IDLE) == [slot]


def test_retired_connections_are_never_chosen() -> None:
    pool = book()
    slot, _ = pool.checkout(KEY, 0)
    pool.retire(slot)  # GOAWAY, closed, or failed to connect
    assert pool.slots() == []
    again, new = pool.checkout(KEY, 0)
    assert new and again is not slot
    assert pool.release(slot, 1) is False  # streams finishing on a retired connection do not make it idle
    assert pool.evict_idle(1e9) == []
