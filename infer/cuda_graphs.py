"""Compilation and CUDA graphs for the decode / verify step.

Two layers of speed-up, both optional (`enforce_eager` turns them off):
- `compiled(fn)`: torch.compile with dynamic shapes, so ONE artifact per function serves every batch bucket,
  sequence bucket and layer (a layer's weights are inputs, not constants). Only sizes 1 vs >1 specialise, so a
  function compiles at most ~4 times. If compilation fails, the function falls back to eager with a warning.
- `StepGraphs`: each step, for its static key (batch bucket, sequence bucket, tree shape, sampling mode), is
  captured once into a `torch.cuda.CUDAGraph` and replayed afterwards: the ~300 kernels of a step cost one
  launch. All graphs share one memory pool (they never run concurrently and keep nothing between replays:
  every result lands in the engine's persistent buffers).
Warm-up runs (and timing runs) advance the engine's slot state; `save` / `restore` put it back, and the K/V
they write lies past every sequence's end, where the next real step overwrites it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch


def configure_dynamo() -> None:
    import torch._dynamo

    # One compiled step function serves several models (target, draft) and specialisations.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Without this, sizes that happen to be equal in the first call (say a prompt of 8 tokens and head_dim 8)
    # become one symbol, and the artifact is specialised to that coincidence.
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)


class compiled:
    """`torch.compile(fn, dynamic=True, fullgraph=True)`, falling back to `fn` if compilation fails."""

    def __init__(self, fn: Callable, name: str | None = None, backend: str = "inductor"):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "step")
        self.compiled_fn = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.fn(*args, **kwargs)
        try:
            return self.compiled_fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly, say so once
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            warnings.warn(f"torch.compile of {self.name} failed ({type(err).__name__}: {err}); running it eagerly", stacklevel=2)
            self.failed = True
            return self.fn(*args, **kwargs)


class StepGraphs:
    """Run step functions by key: eagerly, or as CUDA graphs captured on first use."""

    def __init__(self, device: torch.device, use_graphs: bool, save: Callable[[], object], restore: Callable[[object], None]):
        self.device = device
        self.use_graphs = use_graphs and device.type == "cuda"
        self.save, self.restore = save, restore
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_seconds = 0.0
        self.failed = False

    def _capture(self, key: tuple, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        state = self.save()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles, autotunes, and settles the allocator outside the capture
                fn()
                self.restore(state)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.restore(state)
        torch.cuda.synchronize(self.device)
        self.graphs[key] = graph
        self.capture_seconds += time.perf_counter() - start

    def run(self, key: tuple, fn: Callable[[], None]) -> None:
        if not self.use_graphs or self.failed:
            fn()
            return
        if key not in self.graphs:
            state = self.save()
            try:
                self._capture(key, fn)
            except Exception as err:  # noqa: BLE001 - keep serving without graphs, and say why
                warnings.warn(f"CUDA graph capture failed for {key} ({type(err).__name__}: {err}); running eagerly", stacklevel=2)
                self.failed = True
                torch.cuda.synchronize(self.device)
                self.restore(state)
                fn()
                return
        self.graphs[key].replay()

    def time(self, key: tuple, fn: Callable[[], None], reps: int = 3) -> float:
        """Seconds per step for `key` (median of reps), leaving the engine state as it was."""
        state = self.save()
        self.run(key, fn)  # capture / compile / warm
        self.restore(state)
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            self.run(key, fn)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
            self.restore(state)
        return sorted(times)[len(times) // 2]
