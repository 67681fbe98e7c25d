"""Adaptive speculation: which tree shape (plain decoding included) each step runs."""

from __future__ import annotations

from speculators.infer.tree import TreeShape


class AdaptiveSpeculation:
    """Picks, per step, the tree shape with the most expected tokens per second for the current batch bucket.

    score(shape) = tau(shape) / latency(bucket, shape), where
      - latency is the step time measured when a batch bucket is first used: every shape is timed there
        (CUDA-graph replays, or eager calls without graphs), so growing batches that make verification
        compute-bound move the choice to smaller trees, then to plain decoding; afterwards every real step
        (probes included) moves its shape's estimate towards what it measured (an exponential average);
      - tau(shape) = 1 + sum_d P(shape accepts >= d draft tokens), from per-position running averages (a mean
        over a shape's first 20 steps, then an exponential moving average) updated by every step run with that
        shape, averaged over the batch rows. Plain decoding has tau 1.
    A shape that is not chosen keeps its last estimate. So that it can come back when acceptance changes, it
    is re-tried for one step after `probe` steps, the interval doubling each time (capped at `max_probe`), which
    bounds the cost of trying to a fraction of a percent; a shape that could not win even if every draft were
    accepted ((1 + depth) / latency below the best score, e.g. big trees at large batch) is not re-tried once a
    real step has measured it. Every shape, plain decoding included, is re-tried (same back-off) until a real step
    has measured it at this batch bucket, so no choice rests on warm-up timings alone: speculation is not kept when
    plain decoding is measured to be faster for this batch size. With `adaptive=False`, the largest shape always runs.
    """

    def __init__(self, shapes: list[TreeShape], adaptive: bool = True, prior: float = 0.6, decay: float = 0.05,
                 probe: int = 16, max_probe: int = 1024):
        self.shapes = shapes
        self.adaptive = adaptive and len(shapes) > 1
        self.decay = decay
        self.accept = {s: [prior ** (d + 1) for d in range(s.depth)] for s in shapes}  # P(accept >= d + 1)
        self.observed = {s: 0 for s in shapes}
        self.latency: dict[tuple[int, TreeShape], float] = {}
        self.observations: dict[tuple[int, TreeShape], int] = {}  # real steps seen per (bucket, shape)
        self.probe, self.max_probe = probe, max_probe
        self.interval = {s: probe for s in shapes}
        self.next_probe = {s: probe for s in shapes}
        self.steps = 0

    def tau(self, shape: TreeShape) -> float:
        return 1.0 + sum(self.accept[shape])

    def needs_timing(self, bucket: int) -> list[TreeShape]:
        if not self.adaptive:
            return []
        return [s for s in self.shapes if (bucket, s) not in self.latency]

    def set_latency(self, bucket: int, shape: TreeShape, seconds: float) -> None:
        self.latency[(bucket, shape)] = seconds

    def observe_latency(self, bucket: int, shape: TreeShape, seconds: float, weight: float = 0.1) -> None:
        """A real step's time (launch to the host's read of the results): corrects the warm-up timing, which runs
        one step in isolation at one sequence length (the longest the warm-up covers), towards what steps cost
        in the running batch. The first real step of a shape replaces its warm-up time (within 4x); later ones
        move the estimate by `weight`, and by at most 2x (an outlier, e.g. a stall)."""
        key = (bucket, shape)
        n = self.observations.get(key, 0)
        self.observations[key] = n + 1
        if key not in self.latency:
            self.latency[key] = seconds
            return
        old = self.latency[key]
        if n == 0:
            self.latency[key] = min(max(seconds, old / 4), 4 * old)
        else:
            self.latency[key] = old + weight * (min(max(seconds, old / 2), 2 * old) - old)

    def best(self, bucket: int) -> TreeShape:
        return max(self.shapes, key=lambda s: self.tau(s) / self.latency[(bucket, s)])

    def choose(self, bucket: int) -> TreeShape:
        if not self.adaptive:
            return self.shapes[-1]
        self.steps += 1
        best = self.best(bucket)
        self.interval[best] = self.probe
        best_score = self.tau(best) / self.latency[(bucket, best)]
        for s in self.shapes:
            could_win = (1 + s.depth) / self.latency[(bucket, s)] > best_score  # even if every draft were accepted
            # A latency known only from the warm-up may be wrong either way (plain decoding's too: it was timed at
            # the longest sequence bucket while the chosen shapes' estimates follow the real, shorter ones), so
            # every shape is re-tried until a real step has measured it at this batch bucket.
            stale = (bucket, s) not in self.observations
            if s != best and ((s.depth and could_win) or stale) and self.steps >= self.next_probe[s]:
                self.interval[s] = min(2 * self.interval[s], self.max_probe)
                self.next_probe[s] = self.steps + self.interval[s]
                return s
        return best

    def update(self, shape: TreeShape, accepted: list[int]) -> None:
        """Accepted draft tokens of every row of a step run with `shape`."""
        if not shape.depth or not accepted:
            return
        est, n = self.accept[shape], len(accepted)
        # A running mean over the first steps (the prior counts as one), an exponential average afterwards:
        # a shape that is only probed now and then still learns its acceptance from a few steps.
        self.observed[shape] += 1
        weight = max(self.decay, 1.0 / (self.observed[shape] + 1))
        for d in range(shape.depth):
            rate = sum(a > d for a in accepted) / n
            est[d] += weight * (rate - est[d])

    def summary(self) -> dict:
        return {
            "tau": {s.name: round(self.tau(s), 3) for s in self.shapes},
            "latency_ms": {f"{b}/{s.name}": round(1e3 * t, 3) for (b, s), t in sorted(self.latency.items(), key=lambda x: (x[0][0], x[0][1].n_nodes))},
        }
