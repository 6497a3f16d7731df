"""The benchmark harness: every decoding mode side by side across batch sizes (DESIGN §5).

`run_benchmark(cfg, target, tokenizer, draft, dcfg, prompts, ...)` decodes the same prompt batches
with plain AR and each speculative mode through the same engine (`Decoder`), after a warm-up decode
per mode that takes compilation out of the timing, and records per (mode, batch size, temperature):
tau, per-position acceptance, tokens/s, speedup over AR, whether greedy outputs equal AR's (and the
share of AR's tokens they reproduce, `match_rate_vs_ar`), the flex
branch counts and the measured step cost of each branch relative to an AR step. Optionally it times
`transformers` `generate` on the same weights as a peer row (`hf_baseline`). Results go to
`output_dir` (results.json, plots; the cost profiles too, so a run is self-contained).

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
from flexdraft_jax.bench.rows import Acc, speedups
from flexdraft_jax.common import round_up
from flexdraft_jax.decoding import engine
from flexdraft_jax.decoding.ar import match_rate
from flexdraft_jax.decoding.decoder import Decoder, RunConfig
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


# ----------------------------------------------------------------------------- aggregation

# Prefilled batches kept for the timed repeats of one batch size (all modes and batches).
KEEP_PREFILLED_BYTES = 4 << 30
# AR (the baseline) and flex (the subject) are always repeated. Another mode's later repeats are
# skipped when its first pass's decode took over SLOW_FACTOR times the fastest mode's and over
# SLOW_SECONDS: noise cannot change the verdict on it, and it costs minutes at batch 64. (Bursts of
# load on a shared machine have made one pass 2x slow: a mode cut on such a pass keeps its burst,
# as flex once did at 0.49x of AR.) Cheap decodes are always repeated.
SLOW_FACTOR = 2.5
SLOW_SECONDS = 5.0
# After the planned repeats, AR and flex are timed again, round by round (up to SETTLE_ROUNDS,
# started within SETTLE_SECONDS per batch size), while their latest repeat still cut their
# step-wise decode time by over SETTLE_BY: a burst of load (everything ~2x slow for tens of
# seconds) once covered all four of flex's repeats at batch 4 while AR had a clean one (0.50x of
# AR for one and the same AR executable).
SETTLE_BY = 0.02
SETTLE_ROUNDS = 4
SETTLE_SECONDS = 20.0


def _repeated(names, first: dict, always, repeats: int, within: float | None) -> tuple:
    """The modes timed again after the first pass (`first`: each mode's first-pass decode
    seconds), and those timed a third time and later (`repeats` of their decodes fit in `within`
    seconds, or no limit)."""
    cut = max(SLOW_FACTOR * min(first.values()), SLOW_SECONDS)
    again = [n for n in names if n in always or first[n] <= cut]
    later = [n for n in again if within is None or repeats * first[n] <= within]
    return again, later


def _timed_decode(decoders, pres, keep, max_new_tokens, seed, i, batch, name):
    """Decode batch `i` in mode `name` from its kept prefilled state (kept again) or a new one
    (also when the kept one was prefilled under a cost profile since refined, and decided
    otherwise whether to draft in the prefill: `Decoder.current`)."""
    pre = pres.pop((i, name), None)
    if pre is None or not decoders[name].current(pre):
        pre = decoders[name].start(batch, max_new_tokens, seed=seed)
    gen = decoders[name].decode(pre, reuse=keep)
    if keep:
        pres[(i, name)] = pre
    return gen


def _branch_subset(rel: dict, mode: str) -> dict:
    prefixes = {"ar": ("ar",), "sequential": ("seq",), "parallel": ("par",)}.get(mode)
    if prefixes is None:  # flex / paper: every branch (paper uses one kind per batch size)
        return dict(rel)
    return {k: v for k, v in rel.items() if k.startswith(prefixes)}


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
    hf_baseline: bool = False,
    hf_source: str | None = None,
    output_dir: str,
    num_prompts: int | None = None,
    cache_len: int | None = None,
    repeats: int = 1,
    repeats_within_seconds: float | None = None,
    eos_ids=None,
    seed: int = 0,
    profile_repeats: int = 5,
    profile_seconds: float | None = None,
    meta: dict | None = None,
    plots: bool = True,
    mesh=None,
) -> dict:
    """Benchmark `modes` (AR is always added as the baseline) at each batch size; returns the
    results dict (also written to output_dir/results.json, with plots beside it).

    prompts: token-id lists. `hf_source` is the target checkpoint (None = the embedded GGUF) for
    the `transformers` peer row. `repeats` timed decodes per batch, all with the same seed
    (tokens/s: each step at its fastest repeat, see `rows.Acc`); with `repeats_within_seconds`,
    a mode's repeats after the second run only if `repeats` decodes as long as its first fit in
    that many seconds (extra precision where decodes are cheap). mesh: every Decoder's
    (`Decoder`; None: one device)."""
    from flexdraft_jax.bench import report

    del tokenizer  # prompts arrive encoded; kept in the signature for callers that decode outputs
    specs = [parse_mode(m, threshold, use_calibration) for m in modes]
    if not any(s.mode == "ar" for s in specs):
        specs.insert(0, parse_mode("ar", threshold, use_calibration))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate modes in {names}")
    ar_name = next(s.name for s in specs if s.mode == "ar")
    if draft is None and any(s.mode != "ar" for s in specs):
        raise ValueError("speculative modes need a draft; pass one or benchmark modes=('ar',)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    prompts = list(prompts[:num_prompts] if num_prompts else prompts)
    longest = max(len(p) for p in prompts)
    if cache_len is None:
        cache_len = round_up(longest + max_new_tokens + 2 * dcfg.block_size + 1, 64)
    os.makedirs(output_dir, exist_ok=True)
    profile_dir = os.path.join(output_dir, "profiles")
    greedy = temperature == 0.0
    results = {
        "config": {
            "model": repr(cfg),
            "draft": {"depth": dcfg.depth, "block_size": dcfg.block_size},
            "batch_sizes": list(batch_sizes),
            "modes": names,
            "max_new_tokens": max_new_tokens,
            "threshold": threshold,
            "temperature": temperature,
            "use_calibration": use_calibration,
            "num_prompts": len(prompts),
            "cache_len": cache_len,
            "repeats": repeats,
            "repeats_within_seconds": repeats_within_seconds,
            "devices": _devices(),
            **(meta or {}),
        },
        "rows": [],
        "step_costs": {},
    }
    t_run = time.perf_counter()
    for bs in batch_sizes:
        batches = make_batches(prompts, bs)
        decoders = {
            s.name: Decoder(
                cfg,
                target,
                draft if s.mode != "ar" else None,
                dcfg,
                s.engine_config(temperature),
                cache_len=s.cache_len or cache_len,
                eos_ids=eos_ids,
                run=s.run,
                mesh=mesh,
            )
            for s in specs
        }
        for d in decoders.values():  # bad prompts fail here, before any profile or compile
            d.check(prompts, max_new_tokens)
        # Step costs first (a flex decode reads its profile): every branch forced on a warm state;
        # the flex engine holds all of them. Measured once per batch size, cached in output_dir.
        prof = None
        if draft is not None:
            prof_dec = next((d for d in decoders.values() if d.ecfg.mode == "flex"), None)
            if prof_dec is None:
                ecfg = dataclasses.replace(specs[0].engine_config(temperature), mode="flex")
                prof_dec = Decoder(
                    cfg, target, draft, dcfg, ecfg, cache_len=cache_len, eos_ids=eos_ids, mesh=mesh
                )  # fmt: skip
            log.info("batch %d: profiling the step cost of each branch", bs)
            prof = prof_dec.measure(bs, repeats=profile_repeats, max_seconds=profile_seconds)
            for d in decoders.values():
                d.use(prof)
        # Warm-up: compile each prompt-width bucket's prefill and the steps (a short decode per
        # bucket; max_new_tokens is traced, so the timed decodes reuse these compilations). The
        # prefill is compiled before it runs and timed without it, so the warm-up's prefilled
        # batches are the first timed pass's (at batch 64 a prefill takes ~8 s on this CPU),
        # when every batch's prefilled state, for every mode, fits in KEEP_PREFILLED_BYTES.
        pres = {}  # (batch index, mode) -> a prefilled batch for the next timed decode
        keep = None
        widths = {}
        for i, b in enumerate(batches):
            widths.setdefault(_width_bucket(b), i)
        for name in tqdm(names, desc=f"batch {bs}: warm-up", leave=False):
            for i in widths.values():
                pre = decoders[name].start(batches[i], max_new_tokens, seed=seed)
                decoders[name].decode(pre.capped(2), reuse=True)
                decoders[name].precompile(pre)  # every branch, though the warm-up takes few
                if keep is None:
                    size = sum(x.nbytes for x in jax.tree.leaves(pre.state))
                    keep = size * len(batches) * len(names) <= KEEP_PREFILLED_BYTES
                if keep:
                    pres[i, name] = pre
        if prof:
            # Profiled again after the warm-up, each branch at its faster time: on a shared
            # machine a burst of load lasting seconds can cover a whole profile (seen: every
            # branch 1.4-2.5x slow at batch 1), rarely two measured a minute apart.
            again = prof_dec.measure(bs, repeats=profile_repeats, max_seconds=profile_seconds)
            prof = prof.merged(again)
            prof.save(os.path.join(profile_dir, f"batch{bs}.json"))
            for d in decoders.values():
                d.use(prof)
        rel = prof.relative() if prof else {"ar1": 1.0}
        if prof:
            results["step_costs"][str(bs)] = {
                "relative": rel,
                "seconds": prof.branches,
                "draft_pass_seconds": prof.draft_pass,
                "rows": {k: list(v) for k, v in prof.rows.items()},
            }
        # Timed decodes, repeat by repeat, modes interleaved batch by batch, so a burst of load
        # from elsewhere (seconds long) rarely covers one step's every repeat. Each batch is
        # prefilled once per mode (in the warm-up, for the first batch of each width) and its
        # decode repeated from that state (speed is the decode phase) while the prefilled states
        # fit in KEEP_PREFILLED_BYTES; else each repeat prefills again. Which modes are repeated:
        # `_repeated` (AR and flex always; others unless far slower than the fastest; a third
        # repeat and later only where they fit in `repeats_within_seconds`); then AR and flex
        # again while they are settling (SETTLE_*).
        accs = {n: Acc() for n in names}
        timed = list(names)
        always = [ar_name] + [s.name for s in specs if s.mode == "flex"]
        timed_decode = functools.partial(_timed_decode, decoders, pres, keep, max_new_tokens, seed)

        with tqdm(total=len(batches) * len(names), desc=f"batch {bs}: timed", leave=False) as bar:
            for r in range(repeats):
                if r == 1:
                    first = {n: accs[n].one_pass()["whole"] for n in names}
                    timed, later = _repeated(names, first, always, repeats, repeats_within_seconds)
                elif r == 2:
                    timed = later
                if r > 0:
                    bar.total += len(batches) * len(timed)
                for i, b in enumerate(batches):
                    for name in timed:
                        accs[name].add(timed_decode(i, b, name), repeat=r, batch=i)
                        bar.update()
            r, t_settle = repeats, time.perf_counter()
            settle = [n for n in always if repeats > 1 and accs[n].settling(SETTLE_BY)]
            while (
                settle
                and r < repeats + SETTLE_ROUNDS
                and time.perf_counter() - t_settle < SETTLE_SECONDS
            ):
                bar.total += len(batches) * len(settle)
                for i, b in enumerate(batches):
                    for name in settle:
                        accs[name].add(timed_decode(i, b, name), repeat=r, batch=i)
                        bar.update()
                settle = [n for n in settle if accs[n].settling(SETTLE_BY)]
                r += 1
        pres.clear()
        ar_row = accs[ar_name].row()
        if prof:
            # The AR engine's own step against the flex engine's forced ar1 branch: the overhead
            # of carrying every branch in one lax.switch (1.0 = none).
            results["step_costs"][str(bs)]["ar_mode_step_seconds"] = ar_row["step_seconds"]
            results["step_costs"][str(bs)]["flex_ar1_over_ar_mode"] = prof.branches.get(
                "ar1", float("nan")
            ) / max(ar_row["step_seconds"], 1e-12)
        for spec in specs:
            row = accs[spec.name].row()
            row.update(
                mode=spec.name,
                engine_mode=spec.mode,
                threshold=spec.threshold,
                use_calibration=spec.use_calibration,
                batch_size=bs,
                temperature=temperature,
                num_batches=len(batches),
                **speedups(row, ar_row),
                step_seconds_vs_ar=row["step_seconds"] / max(ar_row["step_seconds"], 1e-12),
                outputs_match_ar=accs[spec.name].same_outputs(accs[ar_name].outputs)
                and accs[ar_name].same_outputs(accs[ar_name].outputs)
                if greedy
                else None,
                # Share of AR's tokens reproduced before the first difference (`ar.match_rate`):
                # in bfloat16 two logits can tie within rounding and the decodes part there.
                match_rate_vs_ar=match_rate(accs[spec.name].outputs, accs[ar_name].outputs)
                if greedy
                else None,
                step_cost=_branch_subset(rel, spec.mode),
                rows_per_branch={
                    k: list(v) for k, v in _branch_subset(prof.rows, spec.mode).items()
                }
                if prof
                else {"ar1": [1, 1]},
            )
            results["rows"].append(row)
        if hf_baseline:
            results["rows"].append(
                hf_row(
                    hf_source,
                    batches,
                    max_new_tokens,
                    cfg,
                    eos_ids,
                    ar_row,
                    accs[ar_name].outputs if greedy else None,
                    repeats,
                    temperature,
                )
            )
        _log_batch(results["rows"], bs)
    results["config"]["wall_seconds"] = time.perf_counter() - t_run
    report.write_results(results, output_dir)
    if plots:
        results["plots"] = report.plot_all(results, output_dir)
        report.write_results(results, output_dir)
    return results


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
