"""The benchmark harness: every decoding mode side by side across batch sizes (DESIGN §5).

`run_benchmark(cfg, target, tokenizer, draft, dcfg, prompts, ...)` decodes the same prompt batches
with plain AR and each speculative mode through the same engine (`Decoder`), after a warm-up decode
per mode that takes compilation out of the timing, and records per (mode, batch size, temperature):
tau, per-position acceptance, tokens/s, speedup over AR, whether greedy outputs equal AR's (and the
share of AR's tokens they reproduce, `match_rate_vs_ar`), the flex
branch counts and the measured step cost of each branch relative to an AR step. Optionally it times
`transformers` `generate` on the same weights as a peer row (`hf_baseline`). Results go to
`output_dir` (results.json, plots; the cost profiles too, so a run is self-contained). How it
times (repeats, settling rounds, step-cost profiles, memory for prefilled batches) is a
`TimingPlan` passed in; `run_benchmark` reads as the recipe, one part per function: per batch size
(`_batch_size`) the profile, the warm-up, the timed rounds and the rows, then the report.

Speed is measured on the decode phase: `tokens_per_s` and `speedup_vs_ar` exclude the prefill and
the first token it yields (identical work in every mode, and with short outputs it would swamp the
comparison); `e2e_tokens_per_s` and `e2e_speedup_vs_ar` include it. `step_seconds_vs_ar` is a mode's
mean decode step over AR's, measured in the run, to hold against the profiled `step_cost`.

Mode specs are `MODE[:OPTION...]` with MODE one of engine.MODES and options `nocalib` (no
bonus-guided calibration), `t=THETA` (confidence threshold; `t=0` verifies the whole block) and
`dv=N` (draft vocabulary size; `dv=0` drafts over the whole vocabulary), and how the host drives
the steps (`decoder.RunConfig`): `device` (the device loop) with `spc=N` (steps per device call),
`host` (host dispatch) with `la=N` (its lookahead; the default "auto" is host on a CPU, device
elsewhere), and `cap=N` (KV cache capacity); e.g. `flex:nocalib`, `sequential:t=0`,
`flex:device:spc=1` or `ar:cap=4096`: the ablations are just more modes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
from tqdm.auto import tqdm

from flexdraft_jax.bench.hf_peer import hf_row
from flexdraft_jax.bench.rows import Acc, paired_speedup, speedups
from flexdraft_jax.common import round_up
from flexdraft_jax.decoding import engine
from flexdraft_jax.decoding.ar import match_rate
from flexdraft_jax.decoding.decoder import Decoder, RunConfig, decode_in_turns
from flexdraft_jax.decoding.sampling import SamplingParams

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- modes and batches


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """One benchmarked configuration: an engine mode plus ablation options."""

    name: str  # the spec as written, used as the row's `mode`
    mode: str
    threshold: float
    use_calibration: bool
    draft_vocab_size: int = engine.EngineConfig.draft_vocab_size
    run: RunConfig = RunConfig()
    cache_len: int | None = None  # KV cache capacity (None: the run's)

    def engine_config(self, temperature: float) -> engine.EngineConfig:
        return engine.EngineConfig(
            mode=self.mode,
            threshold=self.threshold,
            use_calibration=self.use_calibration,
            sampling=SamplingParams(temperature),
            draft_vocab_size=self.draft_vocab_size,
        )


def _count_option(opt: str, what: str, spec: str) -> int:
    """The integer >= 0 after `KEY=` in a mode option."""
    try:
        n = int(opt.partition("=")[2])
    except ValueError:
        raise ValueError(f"bad {what} {opt!r} in mode {spec!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0 in mode {spec!r}")
    return n


def parse_mode(spec: str, threshold: float = 0.01, use_calibration: bool = True) -> ModeSpec:
    """`flex`, `flex:nocalib`, `sequential:t=0`, `flex:dv=0`, `ar:la=0`, ... (defaults from the
    run's flags)."""
    mode, *opts = spec.strip().split(":")
    vocab = engine.EngineConfig.draft_vocab_size
    run = RunConfig()
    cache_len = None
    if mode not in engine.MODES:
        raise ValueError(
            f"unknown mode {mode!r} in {spec!r}; choose from {', '.join(engine.MODES)}"
        )
    for opt in opts:
        if opt == "nocalib":
            use_calibration = False
        elif opt.startswith("t="):
            try:
                threshold = float(opt[2:])
            except ValueError:
                raise ValueError(f"bad threshold {opt!r} in mode {spec!r}") from None
        elif opt.startswith("dv="):
            vocab = _count_option(opt, "draft vocabulary size", spec)
        elif opt.startswith("spc="):
            n = max(_count_option(opt, "steps per call", spec), 1)
            run = dataclasses.replace(run, steps_per_call=n)
        elif opt.startswith("cap="):
            cache_len = _count_option(opt, "cache capacity", spec)
        elif opt in ("host", "device"):
            run = dataclasses.replace(run, dispatch=opt)
        elif opt.startswith("la="):
            run = dataclasses.replace(run, lookahead=_count_option(opt, "lookahead", spec))
        else:
            raise ValueError(
                f"unknown option {opt!r} in mode {spec!r}; use nocalib, t=THETA, dv=N, spc=N, "
                "cap=N, host, device or la=N"
            )
    return ModeSpec(spec.strip(), mode, threshold, use_calibration, vocab, run, cache_len)


def make_batches(prompts: list, batch_size: int, num_prompts: int | None = None) -> list[list]:
    """The first `num_prompts` prompts in batches of `batch_size`. A short last batch (or a set
    smaller than one batch) is filled by repeating prompts from the start: every batch is full."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    prompts = list(prompts[:num_prompts] if num_prompts else prompts)
    if not prompts:
        raise ValueError("no prompts to benchmark")
    n_batches = -(-len(prompts) // batch_size)
    cyc = [prompts[i % len(prompts)] for i in range(n_batches * batch_size)]
    return [cyc[i : i + batch_size] for i in range(0, len(cyc), batch_size)]


# ----------------------------------------------------------------------------- how to time


@dataclasses.dataclass(frozen=True)
class TimingPlan:
    """How the harness times the modes (docs/benchmark.md, "How it times, and why"): override
    fields with `dataclasses.replace(TimingPlan(), ...)`.

    repeats: timed decodes per batch and mode, all with the same seed (a row counts each step at
      its fastest repeat: `rows.Acc`).
    repeats_within_seconds: a mode other than AR and flex gets its third repeat and later only
      if `repeats` decodes as long as its first fit in this many seconds (None: no limit): extra
      precision where it is cheap. AR and flex always get every repeat, and the same number:
      a step's fastest of more repeats is faster, so fewer for one would tilt their comparison.
    slow_factor, slow_seconds: a mode other than AR (the baseline) and flex (the subject) is not
      repeated when its first decode took over `slow_factor` times the fastest mode's and over
      `slow_seconds`: noise cannot change the verdict on it, and its repeats cost minutes at large
      batches. A mode cut on a pass slowed by load keeps that slowness, so AR and flex never are.
      The `transformers` peer row is not repeated once a pass took over `slow_factor` times
      AR's first pass.
    settle_by, settle_rounds, settle_seconds: after the planned repeats AR and flex are timed
      again, both, round by round (up to `settle_rounds`, started within `settle_seconds` per
      batch size), while flex's speedup is not resolved to the fraction `settle_by`: its
      paired range (`rows.paired_speedup`, 5 rounds or more) reaches further on either side.
    warmup_tokens: the token budget of the warm-up decode (the budget is traced, so the timed
      decodes reuse its compilations).
    profile_repeats, profile_seconds: rounds over the branches when profiling step costs, stopping
      after `profile_seconds` (`Decoder.measure`), twice per batch size (before and after the
      warm-up).
    keep_prefilled_bytes: memory for prefilled batches at one batch size (every batch and mode):
      while they fit, each batch is prefilled once per mode (the warm-up's serve as the first
      timed pass) and its decode repeated from that state; else every repeat prefills again.
    """

    repeats: int = 1
    repeats_within_seconds: float | None = None
    slow_factor: float = 2.5
    slow_seconds: float = 5.0
    settle_by: float = 0.02
    settle_rounds: int = 4
    settle_seconds: float = 20.0
    warmup_tokens: int = 2
    profile_repeats: int = 5
    profile_seconds: float | None = None
    keep_prefilled_bytes: int = 4 << 30

    def __post_init__(self):
        for name in ("repeats", "warmup_tokens", "profile_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.settle_rounds < 0:
            raise ValueError(f"settle_rounds must be >= 0, got {self.settle_rounds}")


def split_timing(options: dict, base: TimingPlan = TimingPlan()) -> tuple[TimingPlan, dict]:
    """`options` (run_benchmark keywords, e.g. a config's) as the TimingPlan its timing keys
    make of `base`, and the other keywords."""
    names = {f.name for f in dataclasses.fields(TimingPlan)}
    timing = dataclasses.replace(base, **{k: v for k, v in options.items() if k in names})
    return timing, {k: v for k, v in options.items() if k not in names}


# ----------------------------------------------------------------------------- the run's parts


@dataclasses.dataclass(frozen=True, eq=False)
class _Run:
    """What every batch size of a run shares: the models, the modes, how they decode, the peer."""

    cfg: object
    target: dict
    draft: object
    dcfg: object
    specs: tuple[ModeSpec, ...]
    temperature: float
    max_new_tokens: int
    cache_len: int
    eos_ids: object
    seed: int
    mesh: object
    profiles: dict  # batch size -> CostProfile given (not measured)
    hf_sizes: frozenset  # batch sizes with the `transformers` peer row
    hf_source: str | None  # its checkpoint (None: the embedded GGUF)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def ar_name(self) -> str:
        return next(s.name for s in self.specs if s.mode == "ar")

    @property
    def always(self) -> list[str]:
        """The modes always repeated: AR (the baseline) and flex (the subject)."""
        return [self.ar_name] + [s.name for s in self.specs if s.mode == "flex"]

    def decoder(self, spec: ModeSpec) -> Decoder:
        return Decoder(
            self.cfg, self.target, self.draft if spec.mode != "ar" else None, self.dcfg,
            spec.engine_config(self.temperature), cache_len=spec.cache_len or self.cache_len,
            eos_ids=self.eos_ids, run=spec.run, mesh=self.mesh,
        )  # fmt: skip


def _mode_specs(modes, threshold: float, use_calibration: bool, draft) -> tuple[ModeSpec, ...]:
    """The parsed modes, AR first unless given: refused when duplicated, or speculative without
    a draft."""
    specs = [parse_mode(m, threshold, use_calibration) for m in modes]
    if not any(s.mode == "ar" for s in specs):
        specs.insert(0, parse_mode("ar", threshold, use_calibration))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate modes in {names}")
    if draft is None and any(s.mode != "ar" for s in specs):
        raise ValueError("speculative modes need a draft; pass one or benchmark modes=('ar',)")
    return tuple(specs)


def _profiler(run: _Run, decoders: dict) -> Decoder | None:
    """The decoder to measure step costs with: flex's engine holds every branch (a flex engine
    of the first mode's settings when no mode is flex); None without a draft."""
    if run.draft is None:
        return None
    dec = next((d for d in decoders.values() if d.ecfg.mode == "flex"), None)
    if dec is None:
        ecfg = dataclasses.replace(run.specs[0].engine_config(run.temperature), mode="flex")
        dec = Decoder(run.cfg, run.target, run.draft, run.dcfg, ecfg, cache_len=run.cache_len,
                      eos_ids=run.eos_ids, mesh=run.mesh)  # fmt: skip
    return dec


def _profile(prof_dec: Decoder, decoders: dict, bs: int, timing: TimingPlan, before=None):
    """Every branch forced on a warm state and timed at batch `bs` (merged with the profile
    `before`: `CostProfile.merged`), then used by every decoder: a flex decode reads it. One
    round can do, as every batch size is profiled twice."""
    prof = prof_dec.measure(
        bs, repeats=timing.profile_repeats, max_seconds=timing.profile_seconds, min_repeats=1
    )
    if before is not None:
        prof = before.merged(prof)
    for d in decoders.values():
        d.use(prof)
    return prof


def _warm_up(run: _Run, decoders: dict, batches: list, bs: int, timing: TimingPlan) -> tuple:
    """Compile each prompt-width bucket's prefill and the first steps (a short decode), and for
    AR and flex every step program (`Decoder.precompile`); the other modes compile the rest of
    the steps their first timed decode takes as it takes them (its clock leaves compiling out).
    The prefill is compiled before it runs and timed without it, so the warm-up's prefilled
    batches can be the first timed pass's: returns them,
    {(batch index, mode): Prefilled}, and whether every batch's prefilled state, for every mode,
    fits in `timing.keep_prefilled_bytes` (then the timed repeats keep theirs too)."""
    pres, keep, widths = {}, None, {}
    for i, b in enumerate(batches):
        widths.setdefault(_width_bucket(b), i)
    for name in tqdm(run.names, desc=f"batch {bs}: warm-up", leave=False):
        for i in widths.values():
            pre = decoders[name].start(batches[i], run.max_new_tokens, seed=run.seed)
            decoders[name].decode(pre.capped(timing.warmup_tokens), reuse=True)
            if name in run.always:  # the rest compile just the steps their decodes take
                decoders[name].precompile(pre)  # every branch, though the warm-up takes few
            if keep is None:
                size = sum(x.nbytes for x in jax.tree.leaves(pre.state))
                keep = size * len(batches) * len(run.names) <= timing.keep_prefilled_bytes
            if keep:
                pres[i, name] = pre
    return pres, keep


def _repeated(names, first: dict, always, timing: TimingPlan) -> tuple:
    """The modes timed again after the first pass (`first`: each mode's first-pass decode
    seconds), and those timed a third time and later: AR and flex, and the others whose
    `timing.repeats` decodes fit in `timing.repeats_within_seconds` (or no limit)."""
    cut = max(timing.slow_factor * min(first.values()), timing.slow_seconds)
    again = [n for n in names if n in always or first[n] <= cut]
    within = timing.repeats_within_seconds
    later = [
        n for n in again if n in always or within is None or timing.repeats * first[n] <= within
    ]
    return again, later


def _timed_decode(decoders, pres, keep, max_new_tokens, seed, i, batch, names):
    """Decode batch `i` in each mode of `names`, step by step in turns (`decode_in_turns`; one
    name: a plain decode), each from its kept prefilled state (kept again) or a new one (also
    when the kept one was prefilled under a cost profile since refined, and decided otherwise
    whether to draft in the prefill: `Decoder.current`). Returns their Generations."""
    jobs = []
    for name in names:
        pre = pres.pop((i, name), None)
        if pre is None or not decoders[name].current(pre):
            pre = decoders[name].start(batch, max_new_tokens, seed=seed)
        jobs.append((decoders[name], pre))
        if keep:
            pres[(i, name)] = pre
    return decode_in_turns(jobs, reuse=keep)


def _timed_rounds(run: _Run, decoders, batches, pres, keep, bs, timing: TimingPlan) -> dict:
    """Each mode's `Acc` of its timed decodes: repeat by repeat, modes interleaved batch by
    batch, so a burst of load from elsewhere (seconds long) rarely covers one step's every
    repeat. Which modes each round times: `_repeated`, then `_settle`."""
    names, accs = run.names, {n: Acc() for n in run.names}
    decode = functools.partial(_timed_decode, decoders, pres, keep, run.max_new_tokens, run.seed)
    timed = list(names)
    with tqdm(total=len(batches) * len(names), desc=f"batch {bs}: timed", leave=False) as bar:
        for r in range(timing.repeats):
            if r == 1:
                first = {n: accs[n].one_pass()["whole"] for n in names}
                timed, later = _repeated(names, first, run.always, timing)
            elif r == 2:
                timed = later
            if r > 0:
                bar.total += len(batches) * len(timed)
            _round(accs, decode, batches, timed, run.always, r, bar)
        _settle(accs, decode, batches, run.always, timing, bar)
    pres.clear()
    return accs


def _round(accs, decode, batches, names, always, r: int, bar) -> None:
    """Repeat `r` of every batch in each of `names`: first AR and flex, step by step in turns
    (`decode_in_turns`: a slow phase of the machine then weighs on both alike), AR first on
    even rounds and flex on odd ones; then the other modes one after the other."""
    pair = [n for n in always if n in names][:: -1 if r % 2 else 1]
    for i, b in enumerate(batches):
        groups = ([pair] if pair else []) + [[n] for n in names if n not in always]
        for group in groups:
            for name, gen in zip(group, decode(i, b, group)):
                accs[name].add(gen, repeat=r, batch=i)
                bar.update()


def _settle(accs, decode, batches, always, timing: TimingPlan, bar) -> None:
    """More rounds of AR and flex, both, while flex's speedup is unresolved (`_unresolved`),
    within `timing.settle_rounds` rounds started in `settle_seconds`."""
    r, t_settle = timing.repeats, time.perf_counter()
    while (
        _unresolved(accs, always, timing.settle_by)
        and r < timing.repeats + timing.settle_rounds
        and time.perf_counter() - t_settle < timing.settle_seconds
    ):
        bar.total += len(batches) * len(always)
        _round(accs, decode, batches, always, always, r, bar)
        r += 1


def _unresolved(accs, always, by: float) -> bool:
    """Whether the speedup over AR (`always[0]`) of a flex mode (the rest of `always`) has no
    paired range yet (under 5 rounds) or one reaching beyond the fraction `by` on either side."""
    for name in always[1:]:
        p = paired_speedup(accs[name], accs[always[0]])
        span, speed = p["paired_interval"], p["paired_speedup_vs_ar"]
        if speed is not None and (
            span is None or span[0] < (1 - by) * speed or span[1] > (1 + by) * speed
        ):
            return True
    return False


def _branch_subset(rel: dict, mode: str) -> dict:
    prefixes = {"ar": ("ar",), "sequential": ("seq",), "parallel": ("par",)}.get(mode)
    if prefixes is None:  # flex / paper: every branch (paper uses one kind per batch size)
        return dict(rel)
    return {k: v for k, v in rel.items() if k.startswith(prefixes)}


def _rows(run: _Run, accs: dict, ar_row: dict, bs: int, n_batches: int, prof) -> list[dict]:
    """One row per mode at batch size `bs`: its timing (`Acc.row`), speed against AR's, the
    match with AR's greedy outputs and the step costs of the branches it can take."""
    ar_acc, greedy = accs[run.ar_name], run.temperature == 0.0
    rel = prof.relative() if prof else {"ar1": 1.0}
    rows = []
    for spec in run.specs:
        acc = accs[spec.name]
        same = greedy and acc.same_outputs(ar_acc.outputs) and ar_acc.same_outputs(ar_acc.outputs)
        branch_rows = _branch_subset(prof.rows, spec.mode) if prof else {"ar1": (1, 1)}
        row = acc.row()
        row.update(
            mode=spec.name,
            engine_mode=spec.mode,
            threshold=spec.threshold,
            use_calibration=spec.use_calibration,
            batch_size=bs,
            temperature=run.temperature,
            num_batches=n_batches,
            **speedups(row, ar_row),
            **paired_speedup(acc, ar_acc if spec.name != run.ar_name else Acc()),
            step_seconds_vs_ar=row["step_seconds"] / max(ar_row["step_seconds"], 1e-12),
            outputs_match_ar=same if greedy else None,
            # Share of AR's tokens reproduced before the first difference (`ar.match_rate`):
            # in bfloat16 two logits can tie within rounding and the decodes part there.
            match_rate_vs_ar=match_rate(acc.outputs, ar_acc.outputs) if greedy else None,
            step_cost=_branch_subset(rel, spec.mode),
            rows_per_branch={k: list(v) for k, v in branch_rows.items()},
        )
        # The speedup is the paired one, from the same rounds of both (DESIGN §5: side by side);
        # the ratio of each mode's fastest steps stays beside it.
        row["stepwise_speedup_vs_ar"] = row["speedup_vs_ar"]
        if row["paired_speedup_vs_ar"] is not None:
            row["speedup_vs_ar"] = row["paired_speedup_vs_ar"]
            row["e2e_speedup_vs_ar"] = row["paired_e2e_speedup_vs_ar"]
        rows.append(row)
    return rows


def _step_costs(prof, ar_row: dict) -> dict:
    """The profile at one batch size as the report keeps it, with the AR engine's own step
    against the flex engine's forced ar1 branch: the overhead of carrying every branch in one
    lax.switch (1.0 = none)."""
    return {
        "relative": prof.relative(),
        "seconds": prof.branches,
        "draft_pass_seconds": prof.draft_pass,
        "rows": {k: list(v) for k, v in prof.rows.items()},
        "ar_mode_step_seconds": ar_row["step_seconds"],
        "flex_ar1_over_ar_mode": prof.branches.get("ar1", float("nan"))
        / max(ar_row["step_seconds"], 1e-12),
    }


# ----------------------------------------------------------------------------- the run


def run_benchmark(
    cfg,
    target,
    tokenizer,
    draft,
    dcfg,
    prompts: list[list[int]],
    *,
    batch_sizes=(1, 4, 16, 64),
    modes=("ar", "sequential", "parallel", "flex"),
    max_new_tokens: int = 64,
    threshold: float = 0.01,
    temperature: float = 0.0,
    use_calibration: bool = True,
    num_prompts: int | None = None,
    cache_len: int | None = None,
    eos_ids=None,
    seed: int = 0,
    mesh=None,
    timing: TimingPlan = TimingPlan(),
    profiles: dict | None = None,
    hf_baseline=False,
    hf_source: str | None = None,
    output_dir: str,
    meta: dict | None = None,
    plots: bool = True,
) -> dict:
    """Benchmark `modes` (AR is always added as the baseline) at each batch size; returns the
    results dict (also written to output_dir/results.json, with plots beside it).

    What decodes: prompts (token-id lists, the first `num_prompts`) in `modes`, each with the
    run's `threshold` and `use_calibration` unless its options say otherwise; mesh: every
    Decoder's (`Decoder`; None: one device). How it is timed: `timing`; `profiles` (batch size ->
    `costs.CostProfile`) are used instead of measuring step costs at those batch sizes (another
    prompt set's, measured at the same shapes: batch size and `cache_len`). The `transformers` peer
    row: `hf_baseline` (True: at every batch size; or the batch sizes that get it), from the
    checkpoint `hf_source` (None = the embedded GGUF). Where the
    results go: `output_dir`, with `meta` added to their config and plots unless `plots=False`."""
    del tokenizer  # prompts arrive encoded; kept in the signature for callers that decode outputs
    specs = _mode_specs(modes, threshold, use_calibration, draft)
    prompts = list(prompts[:num_prompts] if num_prompts else prompts)
    if cache_len is None:
        cache_len = _fitting_cache_len(prompts, max_new_tokens, dcfg)
    hf_sizes = frozenset(batch_sizes if hf_baseline is True else hf_baseline or ())
    run = _Run(cfg, target, draft, dcfg, specs, temperature, max_new_tokens, cache_len, eos_ids,
               seed, mesh, dict(profiles or {}), hf_sizes, hf_source)  # fmt: skip
    os.makedirs(output_dir, exist_ok=True)
    config = _config(run, batch_sizes, len(prompts), threshold, use_calibration, timing, meta)
    results = {"config": config, "rows": [], "step_costs": {}}
    t_run = time.perf_counter()
    for bs in batch_sizes:
        rows, step_costs = _batch_size(run, prompts, bs, timing, output_dir)
        results["rows"] += rows
        if step_costs is not None:
            results["step_costs"][str(bs)] = step_costs
        _log_batch(results["rows"], bs)
    results["config"]["wall_seconds"] = time.perf_counter() - t_run
    _write_report(results, output_dir, plots)
    return results


def measure_tau(
    cfg,
    target,
    draft,
    dcfg,
    prompts: list[list[int]],
    *,
    batch_sizes=(1,),
    modes=("sequential",),
    max_new_tokens: int = 64,
    threshold: float = 0.01,
    temperature: float = 0.0,
    use_calibration: bool = True,
    cache_len: int | None = None,
    eos_ids=None,
    seed: int = 0,
    mesh=None,
) -> list[dict]:
    """Tau alone: every batch decoded once in each of `modes` (no AR baseline unless asked, no
    cost profile, nothing timed), one row per mode and batch size with its tau, per-position
    acceptance, tokens, steps and branches. Flex decides on its estimated step costs
    (`Decoder.cost_profile`), so its branches may differ from a benchmark's."""
    specs = [parse_mode(m, threshold, use_calibration) for m in modes]
    if draft is None and any(s.mode != "ar" for s in specs):
        raise ValueError("speculative modes need a draft")
    if cache_len is None:
        cache_len = _fitting_cache_len(prompts, max_new_tokens, dcfg)
    run = _Run(cfg, target, draft, dcfg, tuple(specs), temperature, max_new_tokens, cache_len,
               eos_ids, seed, mesh, {}, frozenset(), None)  # fmt: skip
    rows = []
    for bs in batch_sizes:
        batches = make_batches(prompts, bs)
        for spec in specs:
            dec = run.decoder(spec)
            dec.check(prompts, max_new_tokens)
            acc = Acc()
            for i, b in enumerate(tqdm(batches, desc=f"batch {bs}: {spec.name}", leave=False)):
                acc.add(dec.generate(b, max_new_tokens, seed=seed), batch=i)
            row = acc.row()
            keep = ("tau", "per_position_acceptance", "tokens", "steps", "branch_counts")
            rows.append(dict(mode=spec.name, batch_size=bs, **{k: row[k] for k in keep}))
            log.info("batch %d, %s: tau %.3f", bs, spec.name, row["tau"])
    return rows


def _fitting_cache_len(prompts, max_new_tokens: int, dcfg) -> int:
    """KV cache slots for the longest prompt, its output and two blocks, in multiples of 64."""
    longest = max(len(p) for p in prompts)
    return round_up(longest + max_new_tokens + 2 * dcfg.block_size + 1, 64)


def _batch_size(run: _Run, prompts, bs: int, timing: TimingPlan, output_dir: str) -> tuple:
    """Every mode at batch size `bs`: step costs profiled, everything compiled, the timed rounds;
    returns the rows (the peer's last) and the step costs (None without a draft)."""
    batches = make_batches(prompts, bs)
    decoders = {s.name: run.decoder(s) for s in run.specs}
    for d in decoders.values():  # bad prompts fail here, before any profile or compile
        d.check(prompts, run.max_new_tokens)
    # Step costs first (a flex decode reads its profile), once more after the warm-up, the two
    # merged (`CostProfile.merged`): a burst of load lasting seconds can cover a whole profile,
    # rarely two measured a minute apart.
    prof = run.profiles.get(bs)
    prof_dec = _profiler(run, decoders) if prof is None else None  # given: nothing to measure
    if prof is not None:
        for d in decoders.values():
            d.use(prof)
    elif prof_dec is not None:
        log.info("batch %d: profiling the step cost of each branch", bs)
        prof = _profile(prof_dec, decoders, bs, timing)
    pres, keep = _warm_up(run, decoders, batches, bs, timing)
    if prof_dec is not None:
        prof = _profile(prof_dec, decoders, bs, timing, before=prof)
    if prof is not None:
        prof.save(os.path.join(output_dir, "profiles", f"batch{bs}.json"))
    accs = _timed_rounds(run, decoders, batches, pres, keep, bs, timing)
    ar_row = accs[run.ar_name].row()
    rows = _rows(run, accs, ar_row, bs, len(batches), prof)
    if bs in run.hf_sizes:
        ar_outputs = accs[run.ar_name].outputs if run.temperature == 0.0 else None
        slow = timing.slow_factor * accs[run.ar_name].one_pass()["whole"]
        rows.append(hf_row(run.hf_source, batches, run.max_new_tokens, run.cfg, run.eos_ids,
                           ar_row, ar_outputs, timing.repeats, run.temperature, slow,
                           run.target))  # fmt: skip
    return rows, None if prof is None else _step_costs(prof, ar_row)


def _config(run: _Run, batch_sizes, n_prompts, threshold, use_calibration, timing, meta) -> dict:
    """The results' record of what ran, and where (`meta` added last)."""
    return {
        "model": repr(run.cfg),
        "draft": {"depth": run.dcfg.depth, "block_size": run.dcfg.block_size},
        "batch_sizes": list(batch_sizes),
        "modes": run.names,
        "max_new_tokens": run.max_new_tokens,
        "threshold": threshold,
        "temperature": run.temperature,
        "use_calibration": use_calibration,
        "num_prompts": n_prompts,
        "cache_len": run.cache_len,
        "repeats": timing.repeats,
        "repeats_within_seconds": timing.repeats_within_seconds,
        "devices": _devices(),
        **(meta or {}),
    }


def _write_report(results: dict, output_dir: str, plots: bool) -> None:
    """results.json, then the plots, then results.json again with their paths."""
    from flexdraft_jax.bench import report

    report.write_results(results, output_dir)
    if plots:
        results["plots"] = report.plot_all(results, output_dir)
        report.write_results(results, output_dir)


def _log_batch(rows, bs):
    for r in rows:
        if r["batch_size"] == bs:
            log.info(
                "batch %d %-16s tau %.2f  %.1f tok/s  speedup %.2fx  match %s",
                bs,
                r["mode"],
                r["tau"],
                r["tokens_per_s"],
                r["speedup_vs_ar"],
                r["outputs_match_ar"],
            )


def _width_bucket(batch) -> int:
    from flexdraft_jax.decoding.ar import bucket

    return bucket(max(len(p) for p in batch))


def _devices() -> str:
    import jax

    d = jax.devices()
    return f"{len(d)}x {d[0].device_kind} ({os.cpu_count()} host cores)"
