"""The persistent ws backward's barrier protocol (``bwd.attn_bwd_ws_persistent``), simulated on the CPU.

The worker and the compute warps of each program are modelled as coroutines that wait on and arrive at
mbarriers with the kernel's own parities (``it0 + i`` across tiles, ``kv_empty`` and the tile hand-off
per tile), TMA loads landing at random later steps, and the programs taking tiles from one shared
counter. A random scheduler runs them over random tile lengths (empty tiles included) and checks that
nothing deadlocks, that every tile is done exactly once, and that every shared buffer holds what its
reader expects for as long as it reads it (a refill or an overwrite too early fails). With the split
tail (``HopperBwdConfig.tail``) a ticket past ``t_full`` is a piece of one or two units (``sched.tail_parts``),
handed over one after the other before the next ticket is taken. The sequences mirror ``_bwd_ws_worker`` /
``_bwd_ws_compute`` with ``PERSIST`` and ``_bwd_ws_*_tiles``; keep them in step with the kernel."""

from __future__ import annotations

import random

import pytest

from flashtile.backends.hopper import sched


class Bar:
    """An mbarrier: ``count`` arrivals complete a phase; ``wait(parity)`` passes once the phase of that
    parity completed (PTX ``try_wait.parity``: the current phase's parity differs)."""

    def __init__(self, count: int):
        self.count, self.pending, self.done = count, 0, 0

    def arrive(self):
        self.pending += 1
        if self.pending == self.count:
            self.pending, self.done = 0, self.done + 1

    def passed(self, parity: int) -> bool:
        return (self.done & 1) != parity


def _program(pid: int, nprog: int, tickets: list, ctr: list[int], done: list, ns: int, landing: list):
    """The worker and compute coroutines of program ``pid``; ``tickets[t]``: the units ``(unit, iterations)``
    of ticket ``t`` (a whole tile: one); ``ctr``: the call's tile counter."""
    kv_bar, kv_empty, dq_full, dq_empty, tile_full, tile_empty = (Bar(1) for _ in range(6))
    ld_full, ld_empty = [Bar(2) for _ in range(ns)], [Bar(1) for _ in range(ns)]
    mem = {"kv": None, "dq": None, "tile": None, **{("q", s): None for s in range(ns)},
           **{("st", s): None for s in range(ns)}}  # fmt: skip

    def tma(key, value, bar):
        landing.append((mem, key, value, bar))

    def give_tile(t, k):
        if k > 0:
            yield lambda: tile_empty.passed((k - 1) & 1)
        mem["tile"] = t
        tile_full.arrive()

    def worker():
        it0, k, tk = 0, 0, pid
        while tk < len(tickets):
            for t, total in tickets[tk]:  # (one unit: a tile, or a part of a split tail tile)
                yield from give_tile((t, total), k)
                if k > 0:
                    yield lambda k=k: kv_empty.passed((k - 1) & 1)
                tma("kv", t, kv_bar)
                for st in range(ns):
                    if st < total:
                        g = it0 + st
                        if g >= ns:
                            yield lambda g=g: ld_empty[g % ns].passed((g // ns - 1) & 1)
                        tma(("q", g % ns), (t, g), ld_full[g % ns])
                        mem[("st", g % ns)] = (t, g)
                        ld_full[g % ns].arrive()
                for i in range(total):
                    g = it0 + i
                    nxt_i = i + ns
                    if nxt_i < total:
                        yield lambda g=g: ld_empty[g % ns].passed((g // ns) & 1)
                        tma(("q", (g + ns) % ns), (t, g + ns), ld_full[(g + ns) % ns])
                    yield lambda g=g: dq_full.passed(g & 1)
                    assert mem["dq"] == (t, g), ("dq tile", mem["dq"], g)
                    yield lambda: True  # (the TMA reduce-add reads the tile)
                    assert mem["dq"] == (t, g), ("dq tile overwritten while read", mem["dq"], g)
                    if nxt_i < total:
                        mem[("st", (g + ns) % ns)] = (t, g + ns)
                        ld_full[(g + ns) % ns].arrive()
                    dq_empty.arrive()
                it0 += total
                k += 1
            tk = nprog + ctr[0]  # (the next ticket, once this one's loads and dQ adds are issued)
            ctr[0] += 1
        yield from give_tile(None, k)  # (the kernel's -1: the compute warps stop)

    def take_tile(k, out):
        yield lambda: tile_full.passed(k & 1)
        out[0] = mem["tile"]
        tile_empty.arrive()

    def compute():
        it0, k, cur = 0, 0, [None]
        yield from take_tile(k, cur)
        while cur[0] is not None:
            t, total = cur[0]
            yield lambda k=k: kv_bar.passed(k & 1)
            assert mem["kv"] == t
            for i in range(total):
                g = it0 + i
                s = g % ns
                yield lambda g=g, s=s: ld_full[s].passed((g // ns) & 1)
                assert (mem[("q", s)], mem[("st", s)], mem["kv"]) == ((t, g), (t, g), t), ("slot", s, g)
                yield lambda g=g: dq_empty.passed((g & 1) ^ 1)
                mem["dq"] = (t, g)
                dq_full.arrive()
                yield lambda: True  # (the wgmmas still read the slot and K / V)
                assert (mem[("q", s)], mem["kv"]) == ((t, g), t), ("slot refilled while read", s, g)
                ld_empty[s].arrive()
            assert mem["kv"] == t
            kv_empty.arrive()
            done.append(t)
            it0 += total
            k += 1
            yield from take_tile(k, cur)

    return [worker(), compute()]


def _run(tickets: list, nprog: int, ns: int, rng: random.Random) -> list:
    ctr, done, landing = [0], [], []
    procs = [p for pid in range(min(nprog, len(tickets))) for p in _program(pid, nprog, tickets, ctr, done, ns,
                                                                            landing)]  # fmt: skip
    waits = [lambda: True] * len(procs)
    live = [True] * len(procs)
    for _ in range(200000):
        if not any(live) and not landing:
            return done
        ready = [j for j in range(len(procs)) if live[j] and waits[j]()]
        if landing and (not ready or rng.random() < 0.3):
            mem, key, value, bar = landing.pop(rng.randrange(len(landing)))
            mem[key] = value
            bar.arrive()
            continue
        if not ready:
            raise AssertionError(f"deadlock: tickets {tickets}")
        j = rng.choice(ready)
        try:
            waits[j] = next(procs[j])
        except StopIteration:
            live[j] = False
    raise AssertionError("did not finish")


@pytest.mark.parametrize("seed", range(150))
def test_persistent_backward_protocol(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 1, 2, 3, 5, 8]) for _ in range(rng.randint(1, 12))]
    done = _run([[(t, n)] for t, n in enumerate(lengths)], rng.randint(1, 4), rng.choice([2, 3]), rng)
    assert sorted(done) == list(range(len(lengths)))  # every tile once


@pytest.mark.parametrize("seed", range(100))
def test_persistent_backward_protocol_with_the_split_tail(seed):
    """Whole tiles, then one piece a program of the last ``n_split`` tiles' query blocks (one or two units
    each, ``sched.tail_parts``): no deadlock, every whole tile once, every block of the split tiles once."""
    rng = random.Random(seed)
    nprog = rng.randint(2, 4)
    n_mb = rng.randint(1, 6)
    n_split = rng.randint(1, nprog - 1)  # (a tail shorter than a round: at most two units a piece)
    if n_split * n_mb < nprog:  # (the host's rule keeps every piece non-empty)
        n_mb = -(-nprog // n_split)
    t_full = rng.randint(nprog, 3 * nprog)  # (a whole first round)
    tickets = [[(t, rng.choice([0, 1, 2, 3, 5]))] for t in range(t_full)]
    tickets += [[(("part", j, lo, hi), hi - lo) for j, lo, hi in sched.tail_parts(p, n_split, n_mb, nprog)]
                for p in range(nprog)]  # fmt: skip
    done = _run(tickets, nprog, rng.choice([2, 3]), rng)
    assert sorted(t for t in done if isinstance(t, int)) == list(range(t_full))
    blocks = sorted((j, m) for t in done if not isinstance(t, int) for _, j, lo, hi in [t] for m in range(lo, hi))
    assert blocks == [(j, m) for j in range(n_split) for m in range(n_mb)]
