"""The generation API: `Decoder(cfg, target, draft, dcfg, ecfg).generate(prompts, max_new_tokens)`.

Owns the host loop around the jitted `engine.prefill` / `engine.run` (one sync per call of up to
`RunConfig.steps_per_call` steps on device) or `engine.branch_step` (host dispatch), the cost
profile the flex policy reads (`costs.CostProfile`): given, stored, measured on request (`measure`,
`setup_profile`), or else estimated; a decode never times branches on its own. Executables are
compiled when a decode first needs them, through JAX's persistent compilation cache
(`compilation.enable_cache`), so a second process over the same shapes compiles nothing.

With a `mesh` (`sharding.decode_mesh`, e.g. "data:2,tensor:4") the target and draft are placed by
`sharding.DECODE_RULES`, the batch and the KV cache sharded (`placement`), and every prefill, step
and loop is traced under that mesh: one SPMD program, the same tokens as one device. Every process
of a multi-process run makes the same calls with the same prompts; results come back to each.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import compilation
from flexdraft_jax.decoding import costs as costs_lib
from flexdraft_jax.decoding import engine, placement, policy
from flexdraft_jax.decoding.ar import (
    Generation,
    bucket,
    check_cache_len,
    check_capacity,
    pad_prompts,
    validate_prompts,
)
from flexdraft_jax.decoding.costs import CostProfile, branch_name, profile_plan
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.models.draft import Draft


@dataclasses.dataclass(frozen=True)
class Prefilled:
    """A prefilled batch (`Decoder.start`), ready for `Decoder.decode`."""

    st: engine.Static
    state: engine.DecodeState
    max_new_tokens: int
    prefill_seconds: float

    @property
    def drafts(self) -> bool:
        """Whether the prefill ran the mask block (`engine.prefill_drafts`)."""
        return bool(self.state.block.has_drafts)

    def capped(self, max_new_tokens: int) -> Prefilled:
        """The same batch with a smaller token budget (a short warm-up decode; the arrays are
        shared, so decode it with reuse=True to keep this one intact)."""
        n = min(max_new_tokens, self.max_new_tokens)
        o = self.state.output
        output = o._replace(max_new=jnp.minimum(o.max_new, n), done=o.done | (n <= 1))
        state = self.state._replace(output=output)
        return dataclasses.replace(self, state=state, max_new_tokens=n)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How the host drives the compiled steps (changing these never recompiles a step).

    steps_per_call: steps per `engine.run` call, a `lax.while_loop` on device; the host syncs once
      per call (the same tokens for every value).
    dispatch: "device" (`engine.run`), "host": each step's branch runs as its own executable
      (`engine.branch_step`), launched by the host after it reads the branch the previous step
      chose, or "auto": host on a CPU, device elsewhere. The same tokens either way. On an
      accelerator the per-step host round trip is what the device loop removes; on a CPU the two
      run at the same speed (docs/decoding_loop.md) and host dispatch compiles only the branches
      a decode takes, where the device loop compiles the switch over all of them first.
    lookahead: host dispatch only: steps launched before the host reads a step's result (1: the
      next step is queued while the current one runs, with the branch chosen one step earlier;
      stopping is read one step late too). None: 1 on accelerators, 0 on CPU (where the host
      thread shares the cores with the computation).
    """

    steps_per_call: int = 16
    dispatch: str = "auto"
    lookahead: int | None = None

    def resolved_dispatch(self) -> str:
        """ "device" or "host" ("auto" by the default backend)."""
        if self.dispatch != "auto":
            return self.dispatch
        return "host" if jax.default_backend() == "cpu" else "device"

    def __post_init__(self):
        if self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {self.steps_per_call}")
        if self.dispatch not in ("auto", "device", "host"):
            raise ValueError(f"dispatch must be 'auto', 'device' or 'host', got {self.dispatch!r}")
        if self.lookahead is not None and self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")


class Decoder:
    """Speculative (or plain AR) decoding of prompt batches with one engine configuration.

    draft: a `Draft` record (`loading.load_draft`; its config unless `dcfg` overrides it), bare
    draft parameters with their `dcfg`, or None (AR mode). cache_len: KV cache slots per
    sequence, at most the model's max_position_embeddings (None: 1024, or that maximum if less).
    compilation_cache: the persistent compilation cache's directory (`compilation.enable_cache`;
    None or "none": not turned on). mesh: a `jax.sharding.Mesh` over ("data", "tensor")
    (`sharding.decode_mesh`), or None: one device, the parameters where they are. Everything is
    validated here and in `check`, before anything compiles."""

    def __init__(
        self,
        cfg: ModelConfig,
        target,
        draft: Draft | dict | None,
        dcfg: DraftConfig | None = None,
        ecfg: engine.EngineConfig = engine.EngineConfig(),
        *,
        cache_len: int | None = None,
        eos_ids=None,
        profiles: dict[int, CostProfile] | None = None,
        run: RunConfig = RunConfig(),
        compilation_cache: str | None = compilation.DEFAULT,
        mesh=None,
    ):
        record, dcfg = _draft_record(cfg, target, draft, dcfg)
        cache_len = min(1024, cfg.max_position_embeddings) if cache_len is None else cache_len
        check_cache_len(cfg, cache_len)
        ecfg.sampling.check_vocab(cfg.vocab_size)
        if dcfg.block_size + 2 > cache_len:
            raise ValueError(
                f"block_size {dcfg.block_size} leaves no room in a KV cache of {cache_len} slots"
            )
        if record is None and ecfg.mode != "ar":
            raise ValueError(f"mode {ecfg.mode!r} needs a draft")
        draft, ecfg = _draft_for_engine(cfg, target, record, dcfg, ecfg)
        if mesh is not None:
            target = placement.place_params(cfg, target, mesh)
            draft = placement.place_params(cfg, draft, mesh)
        self.mesh = mesh
        self.cfg, self.target, self.draft, self.dcfg, self.ecfg = cfg, target, draft, dcfg, ecfg
        self.cache_len = cache_len
        self.run_config = run
        self.eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
        self.profiles = dict(profiles or {})
        self._prefills = {}  # (Static, batch, prompt width, drafts) -> compiled prefill
        self._loops = {}  # (Static, window, steps per call, ar_only) -> compiled engine.run
        self._branches = {}  # (Static, branch, window) -> compiled engine.branch_step
        self._ahead = {}  # a key of either -> Future of its compilation (`_compile_ahead`)
        self._steps = {}  # (Static, batch, window) -> compiled engine.step (forced; profiling)
        self.compilation_cache = compilation.enable_cache(compilation_cache)

    def static(self, batch: int) -> engine.Static:
        branches = engine.branches_for(self.ecfg, self.dcfg.block_size, batch)
        return engine.Static(self.cfg, self.dcfg, self.ecfg, branches, self.eos_ids)

    # ------------------------------------------------------------------ generation

    def check(self, prompts, max_new_tokens: int) -> np.ndarray:
        """Validate a batch before anything is compiled, profiled or timed for it: token ids in
        the vocabulary, no empty prompt, room in the cache. Returns the prompt lengths."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        lengths = validate_prompts(prompts, self.cfg.vocab_size)
        w = self.dcfg.block_size
        check_capacity(lengths, max_new_tokens, 2 * w, self.cache_len, f"2 blocks of {w}")
        return lengths

    def _prefill_args(self, prompts, max_new_tokens, seed, abstract=False) -> tuple:
        """The arguments of `engine.prefill` after (st): as arrays, or (abstract) as their shapes,
        for compiling without allocating the cache."""
        lengths = self.check(prompts, max_new_tokens)
        width = min(bucket(int(lengths.max())), self.cache_len)
        dtype, b, m = self.target["embed"]["embedding"].dtype, len(prompts), self.mesh
        tokens, key = pad_prompts(prompts, width), jax.random.PRNGKey(seed)
        if m is None:
            cache = functools.partial(tf.init_cache, self.cfg, b, self.cache_len, dtype)
            inputs = (jnp.asarray(tokens), jnp.asarray(lengths),
                      jax.eval_shape(cache) if abstract else cache(), key)  # fmt: skip
        else:  # the batch over "data", the cache over batch and kv heads
            cache = functools.partial(placement.init_cache, self.cfg, b, self.cache_len, dtype, m)
            inputs = (placement.put_batch(tokens, m), placement.put_batch(lengths, m),
                      jax.eval_shape(cache) if abstract else cache(),
                      placement.put_replicated(key, m))  # fmt: skip
        return (self.target, self.draft, *inputs, self._replicated(np.int32(max_new_tokens)))

    def _prefill_exe(self, st, args, drafts: bool, ahead: bool = False):
        """The compiled prefill for these arguments' shapes, compiled ahead of time and kept, so
        the prefill's first run is timed like any other (a benchmark's warm-up prefill then
        serves as its first timed one)."""
        tokens = args[2]
        shape = (st, tokens.shape[0], tokens.shape[1], drafts)
        exe = self._prefills.get(shape)
        if exe is None:
            with self._on_mesh():
                lowered = engine.prefill.lower(st, *args, drafts=drafts)
            if ahead:  # the first step's program compiles beside the prefill's
                lengths, max_new_tokens = placement.to_host(args[3]), int(args[6])
                self._compile_ahead(st, lowered.out_info, lengths, max_new_tokens)
            exe = self._prefills[shape] = lowered.compile()
        return exe

    def _prefill(
        self, st, prompts, max_new_tokens, seed, drafts=True, ahead=False
    ) -> tuple[engine.DecodeState, float]:
        """The prefilled state, and the seconds its run took (compilation excluded). ahead:
        compile the first step in the background meanwhile (`_compile_ahead`)."""
        args = self._prefill_args(prompts, max_new_tokens, seed)
        exe = self._prefill_exe(st, args, drafts, ahead)
        t0 = time.perf_counter()
        state = jax.block_until_ready(exe(*args))
        return state, time.perf_counter() - t0

    def _on_mesh(self):
        """The context every engine function is traced in (`placement`; thread-local, so a
        compilation on another thread enters it too)."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _replicated(self, x):
        """A host value as an input of the compiled functions (replicated on the mesh)."""
        return jnp.asarray(x) if self.mesh is None else placement.put_replicated(x, self.mesh)

    def _replicated_sharding(self):
        return None if self.mesh is None else jax.sharding.NamedSharding(self.mesh, jax.P())

    def _lower_compile(self, fn, args):
        with self._on_mesh():
            return fn.lower(*args).compile()

    def generate(self, prompts, max_new_tokens: int, *, seed: int = 0) -> Generation:
        """Tokens per prompt (first EOS included) and stats (tau, acceptance, branches, speed;
        and end to end: `wall_seconds`, `time_to_first_token` and `compile_seconds`, the part of
        the wall time spent tracing and compiling)."""
        t0, c0 = time.perf_counter(), compilation.seconds()
        pre = self.start(prompts, max_new_tokens, seed=seed)
        ttft = time.perf_counter() - t0  # the prefill yields each prompt's first token
        gen = self.decode(pre, reuse=False)
        gen.stats.update(
            wall_seconds=time.perf_counter() - t0,
            time_to_first_token=ttft,
            compile_seconds=compilation.seconds() - c0,
        )
        return gen

    def start(self, prompts, max_new_tokens: int, *, seed: int = 0) -> Prefilled:
        """Prefill a batch: a state `decode` can run from, as often as wanted (benchmark repeats
        then time the decode steps without paying for the prefill again)."""
        self.check(prompts, max_new_tokens)
        st = self.static(len(prompts))
        drafts = self._prefill_drafts(st, len(prompts))
        state, seconds = self._prefill(st, prompts, max_new_tokens, seed, drafts, ahead=True)
        return Prefilled(st, state, max_new_tokens, seconds)

    def _prefill_drafts(self, st, batch: int) -> bool:
        return engine.prefill_drafts(st, self._costs(st, batch))

    def current(self, pre: Prefilled) -> bool:
        """Whether `pre` was prefilled as a prefill would be now. Flex decides at the prefill,
        from the cost profile, whether to draft there (`engine.prefill_drafts`); a batch
        prefilled before the profile was refined (a benchmark's warm-up) may have decided
        otherwise, and without drafts flex starts in AR steps and waits for a probe."""
        return pre.drafts == self._prefill_drafts(pre.st, len(pre.state.output.done))

    def decode(self, pre: Prefilled, *, reuse: bool = True) -> Generation:
        """Decode from a prefilled batch. reuse: copy its state first (steps donate theirs), so
        `pre` can be decoded again; False consumes it."""
        return decode_in_turns([(self, pre)], reuse=reuse)[0]

    def decode_steps(self, pre: Prefilled, *, reuse: bool = True):
        """`decode` as a generator that pauses after the state copy and after each host sync
        (one step in host dispatch, one call in the device loop) and returns the Generation. Its
        clock counts only the time it runs, so decodes advanced in turns (`decode_in_turns`)
        each time their own steps."""
        st, max_new_tokens = pre.st, pre.max_new_tokens
        # The profile as it is now (a benchmark refines it after prefilling its first batches).
        costs = self._replicated(self._costs(st, len(pre.state.output.done)))
        state = pre.state
        if reuse:
            state = jax.block_until_ready(jax.tree.map(jnp.copy, state))
        yield
        compiled = compilation.seconds()
        idxs, counts, step_seconds = [], [], []  # per step
        if self.run_config.resolved_dispatch() == "device":
            loop = self._device_loop(st, state, costs, idxs, counts)
        else:
            loop = self._host_loop(st, state, costs, idxs, counts, max_new_tokens)
        ran, owed = 0.0, 0.0  # this decode's own seconds; those not yet shared among steps
        t = _decoding_clock()
        while True:
            try:
                with self._on_mesh():  # entered per resume: other decodes run in between
                    n = next(loop)
            except StopIteration as stop:
                state = stop.value
                break
            now = _decoding_clock()
            ran, owed = ran + now - t, owed + now - t
            if n:  # wall time of each step: a sync's time shared evenly among its steps
                step_seconds += [owed / n] * n
                owed = 0.0
            yield
            t = _decoding_clock()
        ran += _decoding_clock() - t
        compiled = compilation.seconds() - compiled
        gen = self._result(
            st, state, [int(i) for i in idxs], pre.prefill_seconds + ran, pre.prefill_seconds,
            max_new_tokens,
        )  # fmt: skip
        counts = [placement.to_host(c) for c in counts]
        gen.stats["committed_per_step"] = np.asarray(counts).T.tolist() if counts else []
        if self.ecfg.mode == "flex":  # "measured" or "estimate"
            gen.stats["cost_profile"] = self.cost_profile(len(pre.state.output.done)).source
        gen.stats["step_seconds"] = step_seconds
        gen.stats["decode_compile_seconds"] = compiled
        return gen

    def _device_loop(self, st, state, costs, idxs, counts):
        """`engine.run` calls until every sequence is done; appends each step's branch and counts.
        A generator: yields after each host sync the number of steps it ran; returns the state."""
        lengths, done = placement.host_tree((state.cache.lengths, state.output.done))
        spc = self.run_config.steps_per_call
        ar_only = False
        if engine.switches_to_ar(st):  # AR steps run in a loop of their own (`engine.run`)
            status = placement.to_host(engine.first_branch(st, state, costs))
            ar_only = engine.read_status(status)[0] == 0
        while not done.all():
            # The smallest window with room for a step: a call that fills it ends early and the
            # next one reads the next window size (reserving room for all `spc` steps would
            # read up to twice the slots for the whole call).
            window = engine.kv_window(lengths[~done], self.dcfg.block_size, self.cache_len)
            exe = self._loop(st, window, spc, ar_only, state, costs)
            state, br, cnt, nxt_ar = exe(self.target, self.draft, state, costs)
            br, cnt, lengths, done, nxt_ar = placement.host_tree(
                (br, cnt, state.cache.lengths, state.output.done, nxt_ar)
            )  # the one sync per call
            ran = br >= 0
            if not ran.any() and not done.all():  # the window was full: the next is larger
                if window >= self.cache_len or bool(nxt_ar) != ar_only:
                    raise RuntimeError(f"no decoding step fits a cache window of {window} slots")
            ar_only = bool(nxt_ar) and engine.switches_to_ar(st)
            idxs += br[ran].tolist()
            counts += list(cnt[ran])
            yield int(ran.sum())
        return state

    def _host_loop(self, st, state, costs, idxs, counts, max_new_tokens):
        """Host dispatch: one executable per step, its branch read from the previous step's
        status (`RunConfig.lookahead` steps queued ahead). A generator like `_device_loop`."""
        lengths = placement.to_host(state.cache.lengths)
        window = engine.kv_window(lengths, max_new_tokens + self.dcfg.block_size, self.cache_len)
        lookahead = self.run_config.lookahead
        if lookahead is None:
            lookahead = 0 if jax.default_backend() == "cpu" else 1
        nxt, done, n_out = engine.read_status(
            placement.to_host(engine.first_branch(st, state, costs))
        )
        inflight = []  # status of launched steps the host has not read yet
        while not done.all() or inflight:
            # Each step commits >= 1 token per active sequence: stop launching once the steps in
            # flight are sure to exhaust every active sequence's budget.
            if not done.all() and not (n_out[~done] + len(inflight) >= max_new_tokens).all():
                idxs.append(nxt)
                exe = self._branch_step(st, nxt, window, state, costs)
                state, status, count = exe(self.target, self.draft, state, costs)
                counts.append(count)
                inflight.append(status)
                if len(inflight) <= lookahead:
                    continue
            nxt, done, n_out = engine.read_status(placement.to_host(inflight.pop(0)))  # the sync
            yield 1
        return state

    def _compile_ahead(self, st, state, lengths, max_new_tokens: int) -> None:
        """Start compiling, on a background thread, the step programs the first steps will run
        (the policy's first choice, and flex's AR step): XLA compiles on one core, so they build
        beside the prefill's compilation. `state`: the prefill's output (shapes suffice)."""
        costs = self._costs(st, len(lengths))
        first = policy.first_choice(st.branches, st.ecfg, st.width, costs)
        kinds = [k for k, _ in st.branches]
        w = self.dcfg.block_size
        costs = jax.ShapeDtypeStruct(costs.shape, jnp.float32, sharding=self._replicated_sharding())
        jobs = []
        if self.run_config.resolved_dispatch() == "host":
            window = engine.kv_window(lengths, max_new_tokens + w, self.cache_len)
            for b in dict.fromkeys([first] + ([kinds.index("ar")] if "ar" in kinds else [])):
                args = (st, b, self.target, self.draft, state, costs, window)
                jobs.append(((st, b, window), engine.branch_step, args))
        else:
            window = engine.kv_window(lengths, w, self.cache_len)
            spc = self.run_config.steps_per_call
            ar_first = engine.switches_to_ar(st) and kinds[first] == "ar"
            variants = [ar_first] + ([not ar_first] if engine.switches_to_ar(st) else [])
            for v in variants:
                args = (st, self.target, self.draft, state, costs, window, spc, v)
                jobs.append(((st, window, spc, v), engine.run, args))
        for key, fn, args in jobs:
            if key not in self._branches and key not in self._loops and key not in self._ahead:
                job = lambda f=fn, a=args: self._lower_compile(f, a)
                self._ahead[key] = _background().submit(job)

    def _compiled(self, table: dict, key, fn, args):
        """table[key]: `fn` lowered and compiled for `args`, unless it is compiling ahead (then
        its result, waited for) or compiled already."""
        if key not in table:
            job = self._ahead.pop(key, None)
            if job is not None and not job.cancel():
                t0 = time.perf_counter()
                table[key] = job.result()
                compilation.waited(time.perf_counter() - t0)
            else:
                table[key] = self._lower_compile(fn, args)
        return table[key]

    def _branch_step(self, st, branch: int, window: int, state, costs):
        """The compiled `engine.branch_step` of one branch (host dispatch), compiled when first
        chosen: a decode compiles only the branches it takes."""
        args = (st, branch, self.target, self.draft, state, costs, window)
        return self._compiled(self._branches, (st, branch, window), engine.branch_step, args)

    def precompile(self, pre: Prefilled) -> None:
        """Compile every step program a decode from `pre` can reach (a decode otherwise compiles
        each when it first needs it, so which ones depends on the acceptance pattern): a
        benchmark's warm-up, after which timed decodes compile nothing."""
        st, state = pre.st, pre.state
        costs = self._replicated(self._costs(st, len(state.output.done)))
        lengths = placement.to_host(state.cache.lengths)
        w = self.dcfg.block_size
        if self.run_config.resolved_dispatch() == "host":
            window = engine.kv_window(lengths, pre.max_new_tokens + w, self.cache_len)
            for i in range(len(st.branches)):
                self._branch_step(st, i, window, state, costs)
            return
        spc = self.run_config.steps_per_call
        variants = (False, True) if engine.switches_to_ar(st) else (False,)
        window, last = (
            engine.kv_window(lengths, w, self.cache_len),
            engine.kv_window(lengths, pre.max_new_tokens + w, self.cache_len),
        )
        while True:
            for ar_only in variants:
                self._loop(st, window, spc, ar_only, state, costs)
            if window >= last:
                break
            window = min(2 * window, self.cache_len)

    def _loop(self, st, window: int, spc: int, ar_only: bool, state, costs):
        """The compiled `engine.run` for this window (`state`, `costs` give the shapes), compiled
        when first needed: a flex decode that never leaves AR steps never compiles the switch."""
        args = (st, self.target, self.draft, state, costs, window, spc, ar_only)
        return self._compiled(self._loops, (st, window, spc, ar_only), engine.run, args)

    def _force(self, st, idx: int, state, window: int):
        """One compiled step of branch `idx` (forced; profiling)."""
        costs = self._replicated(np.zeros(len(st.branches) + 1, np.float32))
        exe = self._step_exe(st, state, window)
        return exe(self.target, self.draft, state, costs, self._replicated(np.int32(idx)))[0]

    def _step_exe(self, st, state, window: int):
        """`engine.step` compiled ahead of time for `state`'s shapes (arrays or their shapes)."""
        key = (st, state.output.done.shape[0], window)
        if key not in self._steps:
            rep = self._replicated_sharding()
            costs = jax.ShapeDtypeStruct((len(st.branches) + 1,), jnp.float32, sharding=rep)
            force = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
            args = (st, self.target, self.draft, state, costs, force, window)
            self._steps[key] = self._lower_compile(engine.step, args)
        return self._steps[key]

    def _result(self, st, state, idxs, elapsed, t_prefill, max_new_tokens):
        o, s = placement.host_tree((state.output, state.stats))
        tokens = [o.out[i, : min(n, max_new_tokens)].tolist() for i, n in enumerate(o.n_out)]
        steps, n_out, tried, hits = o.steps, o.n_out, s.tried, s.hits
        committed = int((n_out - 1).sum())  # the prefill's bonus is not a step's work
        names = [branch_name(b) for b in st.branches]
        n_tok = sum(len(t) for t in tokens)
        stats = {
            "steps": len(idxs),
            "tokens": n_tok,
            "tau": committed / max(int(steps.sum()), 1),
            "per_position_acceptance": (hits / np.maximum(tried, 1)).tolist(),
            "branch_per_step": [names[i] for i in idxs],
            "branch_counts": {n: int(c) for n, c in zip(names, s.branches)},  # counted on device
            "seconds": elapsed,
            "prefill_seconds": t_prefill,
            "tokens_per_s": n_tok / elapsed if elapsed > 0 else 0.0,
        }
        return Generation(tokens, stats)

    # ------------------------------------------------------------------ cost profile

    def cost_profile(self, batch: int) -> CostProfile:
        """The profile flex decodes by at this batch size: the one given (`profiles`, `use`), else
        `costs.estimate` (never a measurement: `measure` is asked for explicitly)."""
        prof = self.profiles.get(batch)
        if prof is None:
            backend = jax.default_backend()
            itemsize = jnp.dtype(self.target["embed"]["embedding"].dtype).itemsize
            vocab = self._draft_vocab()
            branches = engine.branches_for(self.ecfg, self.dcfg.block_size, batch)
            prof = costs_lib.estimate(
                self.cfg, self.dcfg, batch, branches, backend=backend, itemsize=itemsize,
                draft_vocab=vocab,
            )  # fmt: skip
        return prof

    def use(self, prof: CostProfile) -> None:
        """Decode batches of `prof.batch_size` by this profile."""
        self.profiles[prof.batch_size] = prof

    def setup_profile(self, batch: int, spec: str = "auto", **measure_kw) -> CostProfile:
        """The launch scripts' `--profile`: "none": the estimate; "auto": the profile stored for
        this machine, model and batch under `costs.DEFAULT_STORE`, measured and stored the first
        time; a path: that JSON file (measured and written there when it does not exist yet).
        The profile is then used for batches of `batch`."""
        if spec == "none" or self.ecfg.mode != "flex":
            return self.cost_profile(batch)
        path = spec
        if spec == "auto":
            path = os.path.join(costs_lib.DEFAULT_STORE, f"{self.profile_key(batch)}.json")
        if os.path.exists(path):
            prof = CostProfile.load(path)
            if prof.batch_size != batch:
                raise ValueError(f"{path} is a profile for batch {prof.batch_size}, not {batch}")
        else:
            prof = self.measure(batch, **measure_kw)
            prof.save(path)
        self.use(prof)
        return prof

    def _costs(self, st, batch: int) -> np.ndarray:
        if self.ecfg.mode != "flex":
            return np.zeros(len(st.branches) + 1, np.float32)
        return self.cost_profile(batch).costs(st.branches)

    def _draft_vocab(self) -> int:
        """Ids the draft pass picks among (0: the whole vocabulary)."""
        return int(self.draft["head"]["ids"].size) if self.draft and "head" in self.draft else 0

    def profile_key(self, batch: int) -> str:
        """A digest of what a measured profile depends on (device, model, draft shape, buckets,
        cache, batch, greedy or not, draft vocabulary, mesh): the file name in a profile store."""
        ident = json.dumps(
            [
                jax.devices()[0].device_kind,
                jax.device_count(),
                repr(self.cfg),
                self.dcfg.depth,
                self.dcfg.block_size,
                self.ecfg.row_buckets(self.dcfg.block_size),
                self.cache_len,
                batch,
                self.ecfg.sampling.greedy,
                self._draft_vocab(),
                str(self.target["embed"]["embedding"].dtype),
            ]
            + ([] if self.mesh is None else [dict(self.mesh.shape)])  # the devices' share
        )
        return hashlib.sha1(ident.encode()).hexdigest()[:16]

    def _profile_inputs(self, batch: int):
        """What `measure` decodes from: (Static, context length, prompts, token budget, cache
        window)."""
        st = self.static(batch)
        # A realistic context: attention and cache traffic grow with it (a quarter of the cache).
        ctx = max(8, min(256, self.cache_len // 4))
        prompts = [[1 + (i % max(self.cfg.vocab_size - 1, 1))] * ctx for i in range(batch)]
        budget = self.cache_len - ctx - 2 * self.dcfg.block_size
        window = engine.kv_window(np.array([ctx]), self.dcfg.block_size, self.cache_len)
        return st, ctx, prompts, budget, window

    def compile_measure(self, batch: int):
        """Compile what `measure(batch)` runs (its prefill and the forced step) without running
        or allocating anything, and keep it for `measure`. XLA compiles with Python's lock
        released, so callers can compile several batch sizes at once from threads. Returns the
        compiled step (its `memory_analysis()` says what a step needs on the device)."""
        st, _, prompts, budget, window = self._profile_inputs(batch)
        args = self._prefill_args(prompts, budget, 0, abstract=True)
        out = self._prefill_exe(st, args, True).out_info
        sds = lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None)
        )
        state = jax.tree.map(sds, out)
        return self._step_exe(st, state, window)

    def measure(
        self,
        batch: int,
        *,
        repeats: int = 5,
        max_seconds: float | None = None,
        min_repeats: int = 2,
    ) -> CostProfile:
        """Time each branch (forced) on a warm state, priced against the AR step timed in the
        same round (`_prices`); the draft pass as seq minus its verify.

        repeats: rounds over the branches; with `max_seconds`, rounds stop once that much time
        has gone on them (after at least `min_repeats`, or `repeats` if fewer)."""
        st, ctx, prompts, budget, window = self._profile_inputs(batch)
        state, _ = self._prefill(st, prompts, budget, 0)
        if self.run_config.resolved_dispatch() == "host":
            # the very executables host-dispatched decoding runs: compiled once for both
            zeros = self._replicated(np.zeros(len(st.branches) + 1, np.float32))
            exes = [self._branch_step(st, i, window, state, zeros) for i in range(len(st.branches))]
            force = lambda i, state: exes[i](self.target, self.draft, state, zeros)[0]
        else:
            self._step_exe(st, state, window)
            force = lambda i, state: self._force(st, i, state, window)
        # Branches interleaved round by round. A speculative branch is timed with drafts in
        # hand; the one after AR also without them, which times the draft pass it then runs
        # first (`profile_plan`).
        plan = profile_plan(st.branches)
        samples = {(i, what): [] for i, what in plan}
        t_start = time.perf_counter()
        for r in range(repeats):
            over = max_seconds is not None and time.perf_counter() - t_start > max_seconds
            if over and r >= min_repeats:
                break
            for i, what in plan:
                state = jax.block_until_ready(_rewind(state, ctx))
                t0 = time.perf_counter()
                state = force(i, state)
                jax.block_until_ready(state.cache.lengths)
                samples[i, what].append(time.perf_counter() - t0)
        times, refill = _prices(st.branches, plan, samples)
        w = self.dcfg.block_size
        rows = {branch_name(b): costs_lib.branch_rows(b, w) for b in st.branches}
        return CostProfile(batch, times, refill, rows, "measured")


def _prices(branches, plan, samples: dict) -> tuple[dict[str, float], float]:
    """Seconds per step of each branch, and of the refill, from `measure`'s samples.

    The unit (the AR step; without one, the fastest branch) is its fastest sample: load from
    elsewhere only ever adds time. Every other price is that unit times the median, over rounds,
    of the branch's time over the unit's in the same round. This machine's slow phases last
    longer than a round, so a ratio within one round cancels them, where the fastest samples of
    branches caught in different phases would not."""
    x = {key: np.asarray(v, np.float64) for key, v in samples.items() if v}
    names = [branch_name(b) for b in branches]
    kinds = [k for k, _ in branches]
    unit = (
        kinds.index("ar")
        if "ar" in kinds
        else min(range(len(names)), key=lambda i: x[i, "time"].min())
    )
    per_round = x[unit, "time"]
    base = float(per_round.min())
    ratio = lambda t: float(np.median(t / per_round))
    times = {n: base if i == unit else base * ratio(x[i, "time"]) for i, n in enumerate(names)}
    after_ar = [i for i, what in plan if what == "refill"]  # at most one: one AR branch
    refill = 0.0
    if after_ar:
        i = after_ar[0]
        refill = max(base * ratio(x[i, "refill"] - x[i, "time"]), 0.0)
    return times, refill


def _draft_record(cfg, target, draft, dcfg) -> tuple[Draft | None, DraftConfig]:
    """`Decoder`'s draft argument as a `Draft` record checked against the target (None for AR),
    and the DraftConfig in force: `dcfg` when given (e.g. another block size), else the record's."""
    if isinstance(draft, dict) and {"vocab", "vocab_size", "acceptance"} & draft.keys():
        raise ValueError(
            "draft parameters hold metadata keys (vocab, vocab_size, acceptance): pass a "
            "models.draft.Draft record with them as fields instead"
        )
    record = draft if isinstance(draft, Draft) else Draft(draft, dcfg) if draft else None
    if record is not None:
        record.check_target(cfg, target)
        dcfg = dcfg or record.config
    if dcfg is None:
        raise ValueError("a Decoder without a Draft record needs a DraftConfig (dcfg)")
    return record, dcfg


def _draft_for_engine(cfg, target, record, dcfg, ecfg) -> tuple[dict | None, engine.EngineConfig]:
    """The draft parameters the engine runs (restricted to the draft vocabulary in use) and the
    EngineConfig with what the record resolves: that vocabulary's size and, for
    `alpha_init="draft"`, the prior acceptance (the record's held-out acceptance, else 0.5) and,
    where the record holds its prefill confidence too, the scale from a prompt batch's prefill
    confidence to its own prior (`EngineConfig.alpha_scale`: acceptance / confidence)."""
    draft = None if record is None else record.params
    if record is not None and record.vocab is not None:
        n = engine.draft_vocab_in_use(ecfg.draft_vocab_size, record.vocab_size, len(record.vocab))
        ecfg = dataclasses.replace(ecfg, draft_vocab_size=n)
        if n:
            draft = tf.restrict_draft_vocab(cfg, target, draft, record.vocab[:n])
    if ecfg.alpha_init == "draft":
        acceptance = None if record is None else record.acceptance
        prior = 0.5 if acceptance is None else tuple(acceptance)
        if isinstance(prior, tuple) and len(prior) != dcfg.block_size - 1:
            prior = float(np.mean(prior))  # recorded for another block size: its mean
        ecfg = dataclasses.replace(ecfg, alpha_init=prior)
        conf = None if record is None else record.prefill_confidence
        if conf is not None and isinstance(prior, tuple) and ecfg.alpha_scale is None:
            scale = np.maximum(prior, 1e-3) / np.maximum(conf, 1e-2)
            ecfg = dataclasses.replace(ecfg, alpha_scale=tuple(float(a) for a in scale))
    return draft, ecfg


_POOL = []


def decode_in_turns(jobs, *, reuse: bool = True) -> list[Generation]:
    """Decode prefilled batches, (Decoder, Prefilled) pairs, step by step in turns: one host
    sync of each per turn, in the order given, each decode's clock counting only its own steps
    (`Decoder.decode_steps`). The same tokens as decoding each alone. The benchmark times AR
    against flex so: a slow phase of a shared machine (seconds long) then weighs on neighbouring
    steps of both alike, where whole decodes one after the other can fall in different phases
    (docs/benchmark.md, "How it times, and why")."""
    runs = [dec.decode_steps(pre, reuse=reuse) for dec, pre in jobs]
    out, live = [None] * len(runs), list(range(len(runs)))
    while live:
        for i in list(live):
            try:
                next(runs[i])
            except StopIteration as stop:
                out[i] = stop.value
                live.remove(i)
    return out


def _background() -> concurrent.futures.ThreadPoolExecutor:
    """One worker for compilations ahead of need (XLA releases the GIL while it compiles)."""
    if not _POOL:
        _POOL.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile"))
    return _POOL[0]


def _decoding_clock() -> float:
    """Wall seconds less those spent compiling: a first decode compiles its steps as it reaches
    them, and that time is not decoding (`stats["decode_compile_seconds"]` reports it)."""
    return time.perf_counter() - compilation.seconds()


def _rewind(state: engine.DecodeState, ctx: int) -> engine.DecodeState:
    """Keep a profiling run inside the cache: reset lengths, outputs and stop flags."""
    o = state.output
    return state._replace(
        cache=state.cache._replace(lengths=jnp.full_like(state.cache.lengths, ctx)),
        output=o._replace(n_out=jnp.ones_like(o.n_out), done=jnp.zeros_like(o.done)),
    )
