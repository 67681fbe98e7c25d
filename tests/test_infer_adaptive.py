"""The adaptive rule: the most tokens per second, plain decoding when speculation does not pay, cheap probes."""

from speculators.infer.adaptive import AdaptiveSpeculation
from speculators.infer.tree import TreeShape

PLAIN, CHAIN, TREE = TreeShape(), TreeShape((1, 1, 1), 1), TreeShape((4, 3, 2), 5)


def rule(latency_by_bucket):
    a = AdaptiveSpeculation([PLAIN, CHAIN, TREE])
    for bucket, lat in latency_by_bucket.items():
        assert a.needs_timing(bucket) == [PLAIN, CHAIN, TREE]
        for shape, ms in zip((PLAIN, CHAIN, TREE), lat):
            a.set_latency(bucket, shape, ms)
        assert a.needs_timing(bucket) == []
    return a


def test_small_batch_prefers_the_tree_large_batch_plain():
    a = rule({1: (1.0, 1.05, 1.15), 64: (4.0, 9.0, 40.0)})
    for _ in range(30):  # the tree accepts 2-3 tokens, the chain 1
        a.update(TREE, [3, 2])
        a.update(CHAIN, [1, 1])
    assert 3.4 < a.tau(TREE) < 3.6 and 1.9 < a.tau(CHAIN) < 2.1
    assert a.best(1) == TREE
    assert a.best(64) == PLAIN
    chosen = [a.choose(64) for _ in range(2000)]
    probes = chosen.count(CHAIN)
    assert 0 < probes <= 12  # exponential back-off
    # (1 + 3) / 40 can never beat 1 / 4, but only warm-up timed the tree: it is re-run until a real step is seen
    assert 0 < chosen.count(TREE) <= 12
    a.observe_latency(64, TREE, 40.0)
    assert TREE not in [a.choose(64) for _ in range(4000)]  # measured for real: never again


def test_poor_acceptance_falls_back_to_plain_and_recovers():
    a = rule({1: (1.0, 1.05, 1.15)})
    for _ in range(30):
        a.update(TREE, [0])
        a.update(CHAIN, [0])
    assert a.choose(1) == PLAIN
    seen = []
    for _ in range(200):
        s = a.choose(1)
        seen.append(s)
        if s != PLAIN:  # acceptance came back: the probes see it and the rule switches
            a.update(s, [3])
    assert seen[-1] in (CHAIN, TREE) and seen[-50:].count(PLAIN) == 0


def test_fixed_shape_without_adaptive():
    a = AdaptiveSpeculation([PLAIN, CHAIN, TREE], adaptive=False)
    assert a.needs_timing(1) == [] and a.choose(1) == TREE


def test_real_step_times_correct_a_misleading_warmup_timing():
    """Warm-up timed the chain at 1.5x plain, so with tau ~1.8 the chain wins; real steps cost 2.1x plain: the rule
    must move to plain decoding once it has seen them, and an outlier moves an estimate by at most 2x."""
    a = AdaptiveSpeculation([PLAIN, CHAIN])
    a.set_latency(16, PLAIN, 4.0)
    a.set_latency(16, CHAIN, 6.0)
    for _ in range(30):
        a.update(CHAIN, [1, 0, 1, 1, 0])  # tau 1.6
    assert a.choose(16) == CHAIN
    for _ in range(40):
        shape = a.choose(16)
        a.observe_latency(16, shape, 4.0 if shape == PLAIN else 8.4)
    assert a.latency[(16, CHAIN)] > 4.0 * a.tau(CHAIN) and a.best(16) == PLAIN  # now measured too slow to pay
    assert [a.choose(16) for _ in range(20)].count(PLAIN) >= 18
    a.observe_latency(16, PLAIN, 1000.0)  # a one-off stall
    assert a.latency[(16, PLAIN)] <= 4.0 * 1.1


def test_plain_decoding_is_measured_for_real_too():
    """Batch 64 on the H100 (2026-11-25): warm-up timed plain decoding at the longest sequence bucket (slow), the
    chain's estimate then followed its real, shorter steps, and the chain ran 79 of 81 steps at 0.84x plain's
    speed. Plain decoding must be measured for real as well, and win once it is."""
    a = AdaptiveSpeculation([PLAIN, CHAIN])
    a.set_latency(64, PLAIN, 6.0)
    a.set_latency(64, CHAIN, 6.5)
    for _ in range(30):
        a.update(CHAIN, [1, 1, 0, 2])  # tau 2.0: 2.0 / 6.5 beats 1 / 6.0
    real = {PLAIN: 2.5, CHAIN: 6.0}  # 1 / 2.5 beats 2.0 / 6.0
    chosen = []
    for _ in range(300):
        shape = a.choose(64)
        chosen.append(shape)
        a.observe_latency(64, shape, real[shape])
    assert chosen[0] == CHAIN and PLAIN in chosen[:20]
    assert chosen[-100:].count(PLAIN) >= 95 and a.latency[(64, PLAIN)] == 2.5
