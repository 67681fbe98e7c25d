"""`LLMEngine`: slots, prefill, the speculative step, continuous batching (vLLM's LLMEngine methods).

A request owns one of `max_num_seqs` slots (a row of every KV cache and of the slot state below) from its
prefill until it finishes; waiting requests are prefilled into freed slots at the start of the next step.

Slot state on the device, per slot:
    seq_len  tokens in the KV cache;     token   the target's last choice (the next tree's root, not cached yet)
    hidden   the target's final-norm state at position seq_len - 1 (what MLP heads read)
    prev     the token at position seq_len - 1 (draft models re-feed it); sampling params; active flag.

Anatomy of one decode step (`_step`), all on the device, captured as one CUDA graph per
(batch bucket B, sequence bucket S, tree shape, sampling mode):
    1. draft:   candidates [B, n, h] from the heads (or the draft model's greedy chain)
    2. tree:    unique prefixes -> node tokens [B, N], positions seq_len + depth, slots seq_len + node,
                mask [B, 1, N, S] (sequence so far + ancestors)
    3. verify:  ONE target forward over the N nodes (K/V written at the node slots)
    4. sample:  y at every node from the target's processed distribution (counter-based Gumbel noise)
    5. accept:  follow children whose token equals the parent's y; emit y along the path (a + 1 tokens)
    6. compact: copy the accepted nodes' K/V to slots seq_len + 1 .. seq_len + a (one index copy, all layers)
    7. commit:  seq_len += a + 1, new root / hidden / prev; out[:, 0] = a + 1, out[:, 1:] = emitted tokens
The host then reads `out` (the one device-to-host copy and sync per step), appends tokens, checks stops,
and frees finished slots. Rows in the bucket without a request compute on filler and are ignored.

Async scheduling (vLLM's name for it): the next step only needs the slot state on the device, so it is
launched before the host reads the previous step's `out` (copied into a pinned buffer behind an event); the
host's bookkeeping then overlaps the GPU's next step instead of leaving the GPU idle. A request that ended in
the step being read (EOS, a stop string) has taken part in the next step too; its tokens there are dropped.
The engine waits for the step in flight instead (drains) before a prefill, and when a request could reach
max_tokens in it, so that no step runs past a request's length limit.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass

import torch

from speculators.infer.adaptive import AdaptiveSpeculation
from speculators.infer import gemv as gemv_kernel
from speculators.infer.cuda_graphs import StepGraphs, compiled, configure_dynamo
from speculators.infer.outputs import RequestOutput
from speculators.infer.request import Request
from speculators.infer.sampling import sample
from speculators.infer.sampling_params import SamplingParams
from speculators.infer.tree import TreeShape, accept, build_tree, cache_mask

PREFILL_CHUNK = 512  # prompt tokens per prefill forward (bounds the mask and activation memory)
MIN_SEQ_BUCKET = 128


def buckets(smallest: int, largest: int) -> list[int]:
    """Powers of two from `smallest` below `largest`, then `largest` itself."""
    out, b = [], smallest
    while b < largest:
        out.append(b)
        b *= 2
    return out + [largest]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


@dataclass
class InFlight:
    """A launched decode step whose results the host has not read yet."""

    rows: list[tuple[Request, int]]  # (request, slot) of every running request
    B: int
    shape: TreeShape
    out: torch.Tensor  # [B, depth + 2] host copy of state.out (pinned on CUDA; complete once `event` is)
    event: torch.cuda.Event | None
    issued: float  # perf_counter at launch
    captured: bool  # the launch captured a graph: its time says nothing about later steps


@dataclass
class SlotState:
    token: torch.Tensor  # [slots] long
    prev: torch.Tensor  # [slots] long
    hidden: torch.Tensor  # [slots, E] target dtype
    seq_len: torch.Tensor  # [slots] long
    active: torch.Tensor  # [slots] long (1 = a request holds the slot)
    temperature: torch.Tensor  # [slots] float32 (0 = greedy)
    top_k: torch.Tensor  # [slots] long (vocab size = off)
    top_p: torch.Tensor  # [slots] float32 (1 = off)
    seed: torch.Tensor  # [slots] long
    out: torch.Tensor  # [slots, max_depth + 2] long: accepted + 1, then the emitted tokens

    @classmethod
    def allocate(cls, n: int, hidden_size: int, max_depth: int, dtype: torch.dtype, device) -> SlotState:
        long = dict(dtype=torch.long, device=device)
        return cls(
            token=torch.zeros(n, **long), prev=torch.zeros(n, **long),
            hidden=torch.zeros(n, hidden_size, dtype=dtype, device=device),
            seq_len=torch.zeros(n, **long), active=torch.zeros(n, **long),
            temperature=torch.zeros(n, device=device), top_k=torch.ones(n, **long), top_p=torch.ones(n, device=device),
            seed=torch.zeros(n, **long), out=torch.zeros(n, max_depth + 2, **long),
        )

    def save(self) -> tuple:
        return tuple(t.clone() for t in (self.token, self.prev, self.hidden, self.seq_len, self.out))

    def restore(self, saved: tuple) -> None:
        for t, s in zip((self.token, self.prev, self.hidden, self.seq_len, self.out), saved):
            t.copy_(s)


def tree_inputs(root, cand, seq_len, S: int):
    """Node tokens, RoPE positions, cache slots [B, N], cache mask [B, 1, N, S] and canon of a tree."""
    tree = build_tree(root, cand)
    N = tree.tokens.size(1)
    L = seq_len.unsqueeze(1)
    pos = L + tree.depth
    slots = L + torch.arange(N, device=root.device)
    return tree.tokens, pos, slots, cache_mask(tree.mask, seq_len, S), tree.canon


def verify(logits, hidden, tokens, canon, seq_len, active, temperature, top_k, top_p, seed, pos, mode: str):
    """Sample every node, walk the tree, and compute the slot state after the step."""
    y = sample(logits, temperature, top_k, top_p, seed, pos + 1, mode)  # [B, N]
    a, path = accept(tokens, canon, y)  # [B], [B, h + 1]
    emitted = y.gather(1, path)
    last = path.gather(1, a.unsqueeze(1))  # [B, 1] node of the last accepted token
    new_token = emitted.gather(1, a.unsqueeze(1)).squeeze(1)
    new_prev = tokens.gather(1, last).squeeze(1)
    new_hidden = hidden.gather(1, last.unsqueeze(2).expand(-1, 1, hidden.size(2))).squeeze(1)
    new_len = seq_len + (a + 1) * active
    return a, path, emitted, new_token, new_prev, new_hidden, new_len


class LLMEngine:
    """Continuous-batching speculative decoding engine with vLLM's LLMEngine methods:
    `add_request`, `step`, `abort_request`, `has_unfinished_requests`."""

    def __init__(self, target, tokenizer=None, *, drafter=None, eos_token_ids=(), max_model_len: int, max_num_seqs: int,
                 device, enforce_eager: bool = False, adaptive: bool = True, seed: int = 0, compile_backend: str | None = None,
                 async_scheduling: bool = True, gemv: bool = True):
        self.target = target
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        self.n_slots = max_num_seqs
        self.shapes = drafter.shapes() if drafter is not None else [TreeShape()]
        self.max_depth = max(s.depth for s in self.shapes)
        self.max_nodes = max(s.n_nodes for s in self.shapes)
        # Room past max_model_len for one tree's nodes; a multiple of 16 for aligned attention masks.
        self.cache_len = -(-(max_model_len + self.max_nodes) // 16) * 16
        # The KV caches live in the models (one engine per model at a time: a new engine re-allocates them).
        target.setup_cache(self.n_slots, self.cache_len)
        if drafter is not None:
            drafter.setup(self.n_slots, self.cache_len)
        self._cache = getattr(target, "kv", None)
        self.batch_buckets = buckets(1, self.n_slots)
        self.seq_buckets = buckets(MIN_SEQ_BUCKET, self.cache_len)
        dtype = getattr(target, "dtype", None) or target.output.weight.dtype
        # One spare row: a batch never spans a whole buffer, so compiled code sees the same kind of view
        # (a slice shorter than its base) at every bucket, and need not specialise on "all slots".
        self.state = SlotState.allocate(self.n_slots + 1, target.hidden_size, self.max_depth, dtype, self.device)
        self.vocab_size = target.vocab_size

        # Compile on CUDA unless told not to; `compile_backend` forces a backend (tests trace with "eager").
        # Models and drafters may have been compiled by an earlier engine: every engine sets its own choice.
        backend = compile_backend or ("inductor" if self.device.type == "cuda" and not enforce_eager else None)
        if backend is not None:
            configure_dynamo()
        wrap = (lambda fn, name: compiled(fn, name, backend)) if backend is not None else (lambda fn, name: fn)
        self.tree_inputs, self.verify = wrap(tree_inputs, "tree_inputs"), wrap(verify, "verify")
        self.gemv_report = {}
        for model in (target, getattr(drafter, "model", None)):
            if model is not None and hasattr(model, "block"):
                if backend == "inductor" and gemv:  # batch-1 linears: cuBLAS or the Triton GEMV, the faster here
                    self.gemv_report.update(gemv_kernel.tune(model))
                else:
                    gemv_kernel.reset(model)
                cls = type(model)
                model.prologue = wrap(cls._prologue, "transformer prologue")
                model.block = wrap(cls._block, "transformer block")
                model.epilogue = wrap(cls._epilogue, "transformer epilogue")
        if drafter is not None and hasattr(drafter, "propose"):
            drafter.propose = wrap(getattr(drafter.propose, "fn", drafter.propose), "heads propose")
        # transformers' modeling code may sync or branch on values inside a forward: graphs only for our model.
        models = [target, getattr(drafter, "model", None)]
        capturable = all(getattr(m, "capturable", False) for m in models if m is not None)
        self.graphs = StepGraphs(self.device, use_graphs=capturable and not enforce_eager, save=self.state.save, restore=self.state.restore)
        self.adaptive = AdaptiveSpeculation(self.shapes, adaptive=adaptive)

        self.async_scheduling = async_scheduling
        self.inflight: InFlight | None = None
        # Two host buffers for `out`: step t + 1 is launched before step t's copy is read.
        pinned = self.device.type == "cuda"
        self._out_host = [torch.zeros(self.n_slots, self.max_depth + 2, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._out_next = 0
        self._last_done = 0.0

        self.rng = random.Random(seed)
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.slots: list[Request | None] = [None] * self.n_slots
        self.seq_len = [0] * self.n_slots  # host mirror of state.seq_len
        self.stats = {"steps": 0, "tokens": 0, "step_seconds": 0.0, "prefills": 0, "prefill_seconds": 0.0, "shapes": {},
                      "overlapped": 0}  # steps launched before the previous one was read

    # ---- vLLM LLMEngine API ----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> None:
        """Queue a request; it is prefilled when a slot is free (at the start of a `step`)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_prompt(prompt_token_ids)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this engine has none")
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        req = Request(request_id, prompt, list(prompt_token_ids), params, seed, self.max_model_len, self.eos_token_ids, self.tokenizer)
        self.requests[request_id] = req
        self.waiting.append(req)

    def check_prompt(self, ids: list[int]) -> None:
        if len(ids) == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                f"it must be shorter than the context to leave room for generated tokens"
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req.slot is not None:
            self._free(req)
        else:
            self.waiting.remove(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def step(self) -> list[RequestOutput]:
        """Prefill waiting requests into free slots, run one decode step for all running requests, and return
        the outputs to report (per each request's output_kind). With async scheduling, the decode step's tokens
        are reported by the next call, which launches the step after it first."""
        if getattr(self.target, "kv", None) is not self._cache:
            raise RuntimeError("this engine's model was given to another engine, which re-allocated its KV cache")
        touched: dict[str, Request] = {}
        if self.waiting and None in self.slots:
            self._drain(touched)  # a prefill syncs anyway, and its slot may be one the step in flight frees
            while self.waiting and None in self.slots:
                req = self.waiting.popleft()
                self._prefill(req, self.slots.index(None))
                touched[req.request_id] = req
                if req.finished:  # its first token ended it: the slot must not take part in the decode step
                    self._free(req)
        running = [r for r in self.slots if r is not None and not r.finished]
        if self.inflight is not None and not self._can_overlap(running):
            self._drain(touched)
            running = [r for r in running if not r.finished]
        previous, self.inflight = self.inflight, None
        if running:
            self.inflight = self._launch(running, previous)
            self.stats["overlapped"] += previous is not None
            if not self.async_scheduling:
                self._drain(touched)
        if previous is not None:
            self._collect(previous, touched)
        outputs = []
        for req in touched.values():
            out = req.output()
            if out is not None:
                outputs.append(out)
            if req.finished:
                self._free(req)
                self.requests.pop(req.request_id, None)
        return outputs

    # ---- prefill -----------------------------------------------------------------------------------------------

    def _set_params(self, slot: int, req: Request) -> None:
        p, st = req.params, self.state
        st.temperature[slot] = 0.0 if p.greedy else float(p.temperature)
        st.top_k[slot] = p.top_k if p.top_k > 0 else self.vocab_size
        st.top_p[slot] = float(p.top_p)
        st.seed[slot] = req.seed

    @staticmethod
    def _mode(params: list[SamplingParams]) -> str:
        if all(p.greedy for p in params):
            return "greedy"
        if any(not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in params):
            return "filter"
        return "sample"

    @torch.no_grad()
    def _prefill(self, req: Request, slot: int) -> None:
        start = time.perf_counter()
        req.slot, self.slots[slot] = slot, req
        self._set_params(slot, req)
        st, rows = self.state, slice(slot, slot + 1)
        ids = torch.tensor(req.prompt_token_ids, dtype=torch.long, device=self.device).unsqueeze(0)  # [1, P]
        P = ids.size(1)
        for c0 in range(0, P, PREFILL_CHUNK):
            c1 = min(P, c0 + PREFILL_CHUNK)
            pos = torch.arange(c0, c1, device=self.device).unsqueeze(0)  # [1, T]
            S = -(-c1 // 16) * 16  # attention kernels want the mask's last dimension aligned
            mask = (torch.arange(S, device=self.device) <= pos.unsqueeze(-1)).unsqueeze(1)  # [1, 1, T, S]
            hidden, logits = self.target(ids[:, c0:c1], pos, pos, mask, rows, S, logits="last" if c1 == P else None)
            if self.drafter is not None:
                self.drafter.prefill(ids[:, c0:c1], pos, pos, mask, rows, S)
        position = torch.full((1, 1), P, dtype=torch.long, device=self.device)
        y = sample(logits, st.temperature[rows], st.top_k[rows], st.top_p[rows], st.seed[rows], position, self._mode([req.params]))
        st.token[slot] = y[0, 0]
        st.prev[slot] = ids[0, -1]
        st.hidden[slot] = hidden[0, -1]
        st.seq_len[slot] = P
        st.active[slot] = 1
        self.seq_len[slot] = P
        token = int(y[0, 0])  # the sync of this prefill
        req.append([token], drafted=None, depth=0)
        self.stats["prefills"] += 1
        self.stats["prefill_seconds"] += time.perf_counter() - start

    # ---- decode ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _step(self, B: int, S: int, shape: TreeShape, mode: str) -> None:
        """One draft-verify-accept step for slots [0, B) over cache slots [0, S): device only, no syncs."""
        st, rows, h = self.state, slice(0, B), shape.depth
        L, root = st.seq_len[:B], st.token[:B]
        cand = self.drafter.draft(shape, st.hidden[:B], root, st.prev[:B], L, rows, S) if h else None
        tokens, pos, slots, mask, canon = self.tree_inputs(root, cand, L, S)
        hidden, logits = self.target(tokens, pos, slots, mask, rows, S)
        a, path, emitted, new_token, new_prev, new_hidden, new_len = self.verify(
            logits, hidden, tokens, canon, L, st.active[:B], st.temperature[:B], st.top_k[:B], st.top_p[:B],
            st.seed[:B], pos, mode)
        if h:
            offsets = torch.arange(1, h + 1, device=L.device)
            self.target.compact(rows, L.unsqueeze(1) + path[:, 1:], L.unsqueeze(1) + offsets)
        st.token[:B].copy_(new_token)
        st.prev[:B].copy_(new_prev)
        st.hidden[:B].copy_(new_hidden)
        st.seq_len[:B].copy_(new_len)
        st.out[:B, 0].copy_(a + 1)
        st.out[:B, 1 : h + 2].copy_(emitted)

    def _can_overlap(self, running: list[Request]) -> bool:
        """Whether the next step may be launched before the one in flight is read: not if a request could reach
        its max_tokens (or the context length) in the step in flight, as the next step would run past it."""
        step = self.inflight.shape.depth + 1  # the most tokens a step emits per request
        return self.async_scheduling and all(len(r.output_ids) + step < r.max_tokens for r in running)

    def _launch(self, running: list[Request], inflight: InFlight | None) -> InFlight:
        """Choose the shape and buckets, launch one decode step, and start copying its `out` to the host."""
        B = bucket_for(max(r.slot for r in running) + 1, self.batch_buckets)
        # The host mirror of seq_len lags the step in flight by at most its depth + 1 tokens.
        longest = max(self.seq_len[r.slot] for r in running) + (inflight.shape.depth + 1 if inflight else 0)
        mode = self._mode([r.params for r in running])
        for shape in self.adaptive.needs_timing(B):
            S = bucket_for(longest + shape.n_nodes, self.seq_buckets)
            seconds = self.graphs.time((B, S, shape, mode), lambda s=shape, S=S: self._step(B, S, s, mode))
            self.adaptive.set_latency(B, shape, seconds)
        shape = self.adaptive.choose(B)
        S = bucket_for(longest + shape.n_nodes, self.seq_buckets)  # attention reads cache slots [0, S) only
        start, captured = time.perf_counter(), len(self.graphs.graphs)
        self.graphs.run((B, S, shape, mode), lambda: self._step(B, S, shape, mode))
        out = self._out_host[self._out_next][:B, : shape.depth + 2]
        self._out_next ^= 1
        event = None
        if self.device.type == "cuda":
            out.copy_(self.state.out[:B, : shape.depth + 2], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            out.copy_(self.state.out[:B, : shape.depth + 2])
        return InFlight([(r, r.slot) for r in running], B, shape, out, event, start, len(self.graphs.graphs) != captured)

    def _drain(self, touched: dict[str, Request]) -> None:
        """Read the step in flight, if any (the engine is then in step with the device)."""
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            self._collect(inflight, touched)

    def _collect(self, inflight: InFlight, touched: dict[str, Request]) -> None:
        """Wait for a launched step, append its tokens to its requests, free the slots of finished ones."""
        if inflight.event is not None:
            inflight.event.synchronize()
        out = inflight.out.tolist()  # the one device-to-host read of the step
        done = time.perf_counter()
        # Launch to results, less any time the previous step still held the GPU (overlapped launches).
        seconds = done - max(inflight.issued, self._last_done)
        self._last_done = done
        shape = inflight.shape
        self.stats["step_seconds"] += seconds
        if not inflight.captured:  # a step that captured a graph says nothing about later ones
            self.adaptive.observe_latency(inflight.B, shape, seconds)
        self.stats["steps"] += 1
        self.stats["shapes"][shape.name] = self.stats["shapes"].get(shape.name, 0) + 1
        accepted = []
        for req, slot in inflight.rows:
            if req.finished or req.slot != slot:  # ended (or aborted) in an earlier step: these tokens are void
                continue
            n = out[slot][0]
            accepted.append(n - 1)
            self.seq_len[slot] += n
            before = len(req.output_ids)
            req.append(out[slot][1 : 1 + n], drafted=n - 1, depth=shape.depth)
            self.stats["tokens"] += len(req.output_ids) - before
            touched[req.request_id] = req
            if req.finished:
                self._free(req)
        self.adaptive.update(shape, accepted)

    @torch.no_grad()
    def warmup(self, max_len: int | None = None, max_batch: int | None = None, modes: tuple[str, ...] = ("greedy",)) -> float:
        """Compile and capture, ahead of time, every decode step that sequences of up to `max_len` tokens at up to
        `max_batch` concurrent requests can meet (each batch bucket x sequence bucket x tree shape x sampling
        mode), and time the shapes for the adaptive rule, so that no later step pays for it: a benchmark's
        timed run or a server's first requests. Needs an idle engine; returns the seconds it took."""
        if self.requests:
            raise RuntimeError("warmup needs an idle engine: requests are queued or running")
        self._drain({})
        start = time.perf_counter()
        max_len = min(max_len or self.max_model_len, self.max_model_len)
        top = bucket_for(min(max_batch or self.n_slots, self.n_slots), self.batch_buckets)
        for B in [b for b in self.batch_buckets if b <= top]:
            for shape in self.shapes:
                last = bucket_for(min(max_len + shape.n_nodes, self.cache_len), self.seq_buckets)
                # A real step has at least one token of context before the tree: smaller buckets cannot hold it.
                first = bucket_for(min(1 + shape.n_nodes, self.cache_len), self.seq_buckets)
                for S in [s for s in self.seq_buckets if first <= s <= last]:
                    for mode in modes:
                        saved = self.state.save()
                        self.graphs.run((B, S, shape, mode), lambda B=B, S=S, shape=shape, mode=mode: self._step(B, S, shape, mode))
                        self.state.restore(saved)
            for shape in self.adaptive.needs_timing(B):
                S = bucket_for(min(max_len + shape.n_nodes, self.cache_len), self.seq_buckets)
                seconds = self.graphs.time((B, S, shape, modes[0]), lambda s=shape, S=S: self._step(B, S, s, modes[0]))
                self.adaptive.set_latency(B, shape, seconds)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _free(self, req: Request) -> None:
        slot = req.slot
        if slot is None:
            return
        self.slots[slot] = None
        self.seq_len[slot] = 0
        self.state.active[slot] = 0
        self.state.seq_len[slot] = 0
        req.slot = None

    def engine_stats(self) -> dict:
        s = dict(self.stats)
        s["tokens_per_step"] = s["tokens"] / s["steps"] if s["steps"] else 0.0
        s["graphs"] = len(self.graphs.graphs)
        s["capture_seconds"] = round(self.graphs.capture_seconds, 3)
        s.update(self.adaptive.summary())
        return s
