"""Benchmark harness, report and launch script (issue: one-command demo and benchmark).

On a tiny random model: run_benchmark writes results.json with every required field per (mode,
batch size), greedy speculative outputs equal AR's, plots exist; prompt batching and mode specs;
JSONL "turns" prompts; one subprocess run of launch/benchmark.py on the embedded SmolLM2; and the
`transformers` peer row (slow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from flexdraft_jax.bench import harness, hf_peer, report
from flexdraft_jax.bench import rows as bench_rows
from flexdraft_jax.decoding.decoder import RunConfig
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.recipes import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9], [2, 7]]
ROW_FIELDS = (
    "mode", "batch_size", "temperature", "tau", "per_position_acceptance", "tokens_per_s",
    "speedup_vs_ar", "outputs_match_ar", "branch_counts", "step_cost", "rows_per_branch",
)  # fmt: skip


def tiny(vocab=64, seed=0, peaky=50.0):
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    target = tf.init_target(cfg, jax.random.PRNGKey(seed))
    # Peaky embeddings make greedy continuations repetitive, so some drafts get accepted.
    target["embed"]["embedding"] = target["embed"]["embedding"] * peaky
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)
    draft = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(seed + 1))
    return cfg, target, dcfg, draft


# Repeat counts here are the planned ones: the settling rounds (timing noise decides them) are
# tested on their own.
PLAN = harness.TimingPlan(settle_rounds=0, profile_repeats=1)


def plan(**changes) -> harness.TimingPlan:
    return dataclasses.replace(PLAN, **changes)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg, target, dcfg, draft = tiny()
    out = str(tmp_path_factory.mktemp("bench"))
    modes = ("sequential", "flex", "flex:nocalib")
    res = harness.run_benchmark(
        cfg, target, None, draft, dcfg, PROMPTS, batch_sizes=(1, 3), modes=modes,
        max_new_tokens=12, output_dir=out, eos_ids=(), timing=plan(repeats=2),
    )  # fmt: skip
    return res, out, modes


def test_cheap_decodes_are_all_repeated(tiny_run):
    res, _, _ = tiny_run
    for bs in (1, 3):
        rows = [r for r in res["rows"] if r["batch_size"] == bs]
        for r in rows:  # every decode here is far under PLAN.slow_seconds
            assert len(r["repeat_seconds"]) == 2
            # Step by step, the row is at least as fast as its fastest whole decodes.
            assert r["batches_timed_stepwise"] == r["num_batches"]
            assert r["tokens_per_s"] >= r["fastest_repeat_tokens_per_s"] * (1 - 1e-9)


def test_repeats_beyond_two_only_within_the_time_allowed(tmp_path):
    cfg, target, dcfg, draft = tiny()
    # (within, keep prefilled states, repeats expected of sequential); without keeping, each
    # repeat prefills. AR and flex always get every repeat.
    for within, keep, want in ((0.0, True, 2), (None, True, 3), (None, False, 3)):
        timing = plan(repeats=3, repeats_within_seconds=within,
                      keep_prefilled_bytes=(1 << 40) if keep else 0)  # fmt: skip
        res = harness.run_benchmark(
            cfg, target, None, draft, dcfg, PROMPTS[:2], batch_sizes=(2,),
            modes=("flex", "sequential"), max_new_tokens=4,
            output_dir=str(tmp_path / f"{within}{keep}"), eos_ids=(), timing=timing, plots=False,
        )  # fmt: skip
        for r in res["rows"]:  # cheap decodes: every mode is repeated
            n = want if r["mode"] == "sequential" else 3
            assert len(r["repeat_seconds"]) == n, (within, r["mode"])
        assert all(r["outputs_match_ar"] and r["batches_timed_stepwise"] for r in res["rows"])


def test_which_modes_are_repeated():
    """The demo's batch 64 (first-pass decode seconds): sequential and parallel are far slower
    than the fastest and are not repeated; AR and flex are, four times. Flex is repeated as
    often as AR even when a burst of load made its first pass slow; another mode whose four
    decodes would not fit in the time allowed stops at two."""
    names = ["ar", "sequential", "parallel", "flex"]
    always = {"ar", "flex"}
    demo = harness.TimingPlan(repeats=4, repeats_within_seconds=60.0)  # slow: 2.5x and 5 s
    no_limit = dataclasses.replace(demo, repeats_within_seconds=None)
    first = {"ar": 6.5, "sequential": 20.8, "parallel": 39.8, "flex": 6.6}
    assert harness._repeated(names, first, always, demo) == (["ar", "flex"], ["ar", "flex"])
    burst = dict(first, flex=21.0)
    assert harness._repeated(names, burst, always, demo) == (["ar", "flex"], ["ar", "flex"])
    assert harness._repeated(names, burst, always, no_limit) == (["ar", "flex"], ["ar", "flex"])
    cheap = {"ar": 1.0, "sequential": 2.4, "parallel": 4.9, "flex": 1.1}  # all under 5 s
    assert harness._repeated(names, cheap, always, demo) == (names, names)
    tight = dataclasses.replace(demo, repeats_within_seconds=10.0)  # parallel: 4 x 4.9 s
    assert harness._repeated(names, cheap, always, tight) == (names, ["ar", "sequential", "flex"])


def test_ar_and_flex_are_timed_together_in_turns():
    """Each round decodes AR and flex of a batch together, step by step in turns (load drifting
    over seconds weighs on both alike), AR first on even rounds and flex on odd ones, then each
    other mode alone."""
    calls, added = [], []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def add(self, gen, repeat, batch):
            added.append((self.name, gen, repeat, batch))

    def decode(i, b, group):
        calls.append((i, tuple(group)))
        return [f"{n}@{i}" for n in group]

    names = ["ar", "sequential", "parallel", "flex"]
    accs = {n: Recorder(n) for n in names}
    bar = types.SimpleNamespace(update=lambda: None)
    for r in (0, 1):
        harness._round(accs, decode, ["b0", "b1"], names, ["ar", "flex"], r, bar)
    rest = [("sequential",), ("parallel",)]
    want = [(i, g) for i in (0, 1) for g in [("ar", "flex")] + rest]
    want += [(i, g) for i in (0, 1) for g in [("flex", "ar")] + rest]
    assert calls == want
    assert all(gen == f"{name}@{batch}" for name, gen, _, batch in added)  # each to its own
    assert len(added) == 16


def test_timing_plan_is_checked_and_split_from_run_keywords():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        harness.TimingPlan(repeats=0)
    with pytest.raises(ValueError, match="settle_rounds must be >= 0"):
        dataclasses.replace(PLAN, settle_rounds=-1)
    keywords = {"repeats": 4, "profile_seconds": 6.0, "modes": ("ar",), "max_new_tokens": 8}
    timing, rest = harness.split_timing(keywords, PLAN)
    assert timing == dataclasses.replace(PLAN, repeats=4, profile_seconds=6.0)
    assert rest == {"modes": ("ar",), "max_new_tokens": 8}


def test_flex_is_unresolved_until_its_paired_range_is_narrow():
    from flexdraft_jax.decoding.ar import Generation

    def gen(seconds):
        stats = {"tokens": 20, "seconds": seconds, "prefill_seconds": 0.0, "steps": 9,
                 "step_seconds": [seconds / 9] * 9}  # fmt: skip
        return Generation([[1] * 10, [2] * 10], stats)

    ar, flex = bench_rows.Acc(), bench_rows.Acc()
    accs = {"ar": ar, "flex": flex}
    spread = [1.0, 1.01, 0.99, 1.005, 0.995, 1.08]  # flex's time over AR's, round by round
    for r, f in enumerate(spread):
        ar.add(gen(1.0), repeat=r)
        flex.add(gen(f), repeat=r)
        rounds = r + 1
        # Under 5 rounds: no range yet. Five within 1%: resolved to 2%. The sixth round widens
        # the range to 8%.
        assert harness._unresolved(accs, ["ar", "flex"], 0.02) == (rounds < 5 or rounds == 6)
    assert harness._unresolved(accs, ["ar", "flex"], 0.1) is False
    assert harness._unresolved(accs, ["ar"], 0.0) is False  # no flex: nothing to resolve


def test_ar_and_flex_are_timed_again_while_settling(tmp_path):
    """Extra rounds (up to `settle_rounds`) for AR and flex only, while flex's speedup is
    unresolved: always with a bar no range meets (-1), until 5 rounds give a range, and none
    once the range meets the bar (2: any range does)."""
    cfg, target, dcfg, draft = tiny()
    for repeats, by, extra in ((5, -1.0, 4), (2, 2.0, 3), (5, 2.0, 0)):
        res = harness.run_benchmark(
            cfg, target, None, draft, dcfg, PROMPTS[:2], batch_sizes=(2,),
            modes=("flex", "sequential"), max_new_tokens=4,
            output_dir=str(tmp_path / f"{repeats}_{by}"), eos_ids=(), plots=False,
            timing=plan(repeats=repeats, settle_rounds=4, settle_by=by),
        )  # fmt: skip
        got = {r["mode"]: len(r["repeat_seconds"]) for r in res["rows"]}
        want = {"ar": repeats + extra, "flex": repeats + extra, "sequential": repeats}
        assert got == want, (repeats, by)
        assert all(r["outputs_match_ar"] and r["batches_timed_stepwise"] for r in res["rows"])


def test_repeats_only_for_modes_near_the_fastest(tmp_path):
    """With no slack at all every speculative mode but flex counts as slow: only AR (the
    baseline) and flex (the subject) are repeated."""
    cfg, target, dcfg, draft = tiny()
    res = harness.run_benchmark(
        cfg, target, None, draft, dcfg, PROMPTS[:2], batch_sizes=(2,),
        modes=("flex", "sequential"), max_new_tokens=4, output_dir=str(tmp_path), eos_ids=(),
        timing=plan(repeats=3, slow_factor=0.0, slow_seconds=0.0), plots=False,
    )  # fmt: skip
    got = {r["mode"]: len(r["repeat_seconds"]) for r in res["rows"]}
    assert got == {"ar": 3, "flex": 3, "sequential": 1}
    assert all(r["outputs_match_ar"] for r in res["rows"])


def test_each_batch_is_prefilled_once_per_mode(tmp_path, monkeypatch):
    """The warm-up's prefilled batches are the first timed pass's, and repeats decode from
    them again, while they fit in memory; else every timed decode prefills anew."""
    cfg, target, dcfg, draft = tiny()
    starts = []
    start = harness.Decoder.start

    def counted(self, prompts, *a, **k):
        starts.append((self.ecfg.mode, tuple(map(tuple, prompts))))
        return start(self, prompts, *a, **k)

    monkeypatch.setattr(harness.Decoder, "start", counted)
    batches = [PROMPTS[:2], PROMPTS[2:4], [PROMPTS[4], PROMPTS[0]]]
    for keep in (True, False):
        timing = plan(repeats=2, repeats_within_seconds=0.0,
                      keep_prefilled_bytes=(1 << 40) if keep else 0)  # fmt: skip
        starts.clear()
        res = harness.run_benchmark(
            cfg, target, None, draft, dcfg, PROMPTS, batch_sizes=(2,), modes=("sequential",),
            max_new_tokens=6, output_dir=str(tmp_path / str(keep)), eos_ids=(), timing=timing,
            plots=False,
        )  # fmt: skip
        assert all(r["outputs_match_ar"] for r in res["rows"])
        for mode in ("ar", "sequential"):
            repeats = len(next(r for r in res["rows"] if r["mode"] == mode)["repeat_seconds"])
            for i, b in enumerate(batches):
                n = starts.count((mode, tuple(map(tuple, b))))
                # Not kept: the warm-up's batch (the first) is prefilled once more for timing.
                want = 1 if keep else repeats + (i == 0)
                assert n == want, (keep, mode, b)


def test_a_kept_batch_prefilled_under_a_stale_profile_is_prefilled_again():
    """A batch prefilled without drafts (the warm-up's profile: speculation does not pay) and
    kept, is prefilled again for a timed decode once the refined profile says flex would draft
    in the prefill: flex then speculates from its first step, as on a batch prefilled now."""
    from flexdraft_jax.decoding import engine
    from flexdraft_jax.decoding.decoder import CostProfile, Decoder

    cfg, target, dcfg, draft = tiny()
    b, batch = 2, PROMPTS[:2]
    dear = {"ar1": 1.0, "seq2": 50.0, "seq4": 50.0, "par2": 50.0, "par4": 50.0}
    cheap = {**dear, "seq2": 1.0, "seq4": 1.0}
    ecfg = engine.EngineConfig(mode="flex", buckets=(2, 4), alpha_init=0.5, gain="acceptance")
    dec = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=64, eos_ids=(),
                  profiles={b: CostProfile(b, dear, 0.1)})  # fmt: skip
    stale = dec.start(batch, 6)
    assert not stale.drafts
    pres = {(0, "flex"): stale}
    dec.profiles[b] = CostProfile(b, cheap, 0.1)  # refined
    (gen,) = harness._timed_decode({"flex": dec}, pres, True, 6, 0, 0, batch, ["flex"])
    assert pres[0, "flex"] is not stale and pres[0, "flex"].drafts
    assert gen.stats["branch_per_step"][0] != "ar1"
    # Still current: decoded from the kept state, not prefilled again.
    again = pres[0, "flex"]
    harness._timed_decode({"flex": dec}, pres, True, 6, 0, 0, batch, ["flex"])
    assert pres[0, "flex"] is again


def test_results_json_fields(tiny_run):
    res, out, modes = tiny_run
    with open(os.path.join(out, report.RESULTS_FILE)) as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    got = {(r["mode"], r["batch_size"]) for r in saved["rows"]}
    assert got == {(m, b) for m in ("ar", *modes) for b in (1, 3)}  # AR added as the baseline
    for r in saved["rows"]:
        missing = [k for k in ROW_FIELDS if k not in r]
        assert not missing, (r["mode"], missing)
        assert r["tokens_per_s"] > 0 and r["speedup_vs_ar"] > 0
        # Every sequence decodes 12 tokens (no EOS); the prefill commits the first. tau is the
        # tokens committed per sequence step: at batch 1 (a sequence per batch, always active)
        # exactly the committed tokens over the steps; at batch 3 between that over 3 sequences
        # and over 1.
        sequences = r["num_batches"] * r["batch_size"]
        assert r["tokens"] == 12 * sequences, r
        committed = r["tokens"] - sequences
        if r["batch_size"] == 1:
            assert r["tau"] == pytest.approx(committed / r["steps"]), r
        else:
            assert committed / (3 * r["steps"]) <= r["tau"] <= committed / r["steps"], r
        if r["mode"] == "ar":  # one token per step, 11 steps per batch
            assert r["tau"] == 1.0 and r["steps"] == 11 * r["num_batches"], r
    ar = {r["batch_size"]: r for r in saved["rows"] if r["mode"] == "ar"}
    for r in saved["rows"]:  # step-wise: AR's fastest decode time per token over the mode's
        want = ar[r["batch_size"]]["seconds_per_token"] / r["seconds_per_token"]
        assert r["stepwise_speedup_vs_ar"] == pytest.approx(want), r
    for r in saved["rows"]:  # the speedup: round by round against AR, every repeat of both
        if r["mode"] == "ar":
            assert r["paired_interval"] is None and r["speedup_vs_ar"] == 1.0
            continue
        assert r["speedup_vs_ar"] == r["paired_speedup_vs_ar"]
        assert r["paired_rounds"] == len(r["repeat_seconds"]), r
        if r["paired_rounds"] >= 5:
            lo, hi = r["paired_interval"]
            assert lo <= r["speedup_vs_ar"] <= hi, r
    flex = next(r for r in saved["rows"] if r["mode"] == "flex" and r["batch_size"] == 1)
    assert set(flex["step_cost"]) == {"ar1", "seq2", "seq4", "par2", "par4"}
    seconds = saved["step_costs"]["1"]["seconds"]  # the profile's measured step times
    assert all(seconds[k] > 0 for k in flex["step_cost"])
    for k, rel in flex["step_cost"].items():  # relative to the measured AR step
        assert rel == pytest.approx(seconds[k] / seconds["ar1"]), (k, rel, seconds)
    assert flex["rows_per_branch"]["par4"] == [4, 4 + 4 * 4]
    assert sum(flex["branch_counts"].values()) == flex["steps"]
    assert saved["step_costs"]["1"]["ar_mode_step_seconds"] > 0
    seq = next(r for r in saved["rows"] if r["mode"] == "sequential")
    assert set(seq["step_cost"]) == {"seq2", "seq4"}
    assert set(saved["step_costs"]) == {"1", "3"}
    # Profiles live inside the output directory, so a run is self-contained.
    assert os.listdir(os.path.join(out, "profiles"))


def test_greedy_outputs_match_ar(tiny_run):
    res, _, _ = tiny_run
    assert all(r["outputs_match_ar"] is True for r in res["rows"])
    assert any(r["tau"] > 1.0 for r in res["rows"])  # the accept path ran


def test_tau_only_is_the_benchmarks_tau(tiny_run):
    """`measure_tau` (one untimed decode per batch, no AR) gives the benchmark's tau and
    per-position acceptance for a mode that does not read step costs."""
    res, _, _ = tiny_run
    cfg, target, dcfg, draft = tiny()
    rows = harness.measure_tau(
        cfg, target, draft, dcfg, PROMPTS, batch_sizes=(1, 3), modes=("sequential",),
        max_new_tokens=12, eos_ids=(),
    )  # fmt: skip
    assert [(r["mode"], r["batch_size"]) for r in rows] == [("sequential", 1), ("sequential", 3)]
    for r in rows:
        want = next(
            w for w in res["rows"] if (w["mode"], w["batch_size"]) == (r["mode"], r["batch_size"])
        )
        assert r["tau"] > 1.0 and r["tau"] == want["tau"]
        np.testing.assert_allclose(r["per_position_acceptance"], want["per_position_acceptance"])
        assert r["steps"] == want["steps"] and r["branch_counts"] == want["branch_counts"]


def test_plots_and_table(tiny_run):
    res, out, _ = tiny_run
    for name in ("speedup.png", "acceptance.png", "step_cost.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = report.format_table(res)
    assert "flex:nocalib" in table and "speedup" in table
    rows = [dict(r) for r in res["rows"] if r["batch_size"] == 1]
    flex = next(r for r in rows if r["mode"] == "flex")
    flex.update(paired_interval=[0.912, 1.071], speedup_vs_ar=0.987)
    line = next(
        x for x in report.format_table({"rows": rows}).splitlines() if x.startswith("flex ")
    )
    assert "0.99x  0.91-1.07" in line
    assert "seq2" in report.format_step_costs(res)


def test_make_batches_fills_and_repeats():
    assert harness.make_batches([[1], [2], [3]], 4) == [[[1], [2], [3], [1]]]
    assert harness.make_batches([[1], [2], [3]], 2) == [[[1], [2]], [[3], [1]]]
    assert harness.make_batches([[1], [2], [3]], 1, num_prompts=2) == [[[1]], [[2]]]
    with pytest.raises(ValueError, match="batch size"):
        harness.make_batches([[1]], 0)


def test_parse_mode():
    s = harness.parse_mode("flex:nocalib:t=0")
    assert (s.mode, s.use_calibration, s.threshold) == ("flex", False, 0.0)
    assert harness.parse_mode("paper", threshold=0.1).threshold == 0.1
    with pytest.raises(ValueError, match="unknown mode"):
        harness.parse_mode("turbo")
    with pytest.raises(ValueError, match="unknown option"):
        harness.parse_mode("flex:fast")
    assert harness.parse_mode("flex").draft_vocab_size is None  # the draft's recorded size
    s = harness.parse_mode("flex:dv=0")
    assert s.draft_vocab_size == 0 and s.engine_config(0.0).draft_vocab_size == 0
    with pytest.raises(ValueError, match="draft vocabulary size"):
        harness.parse_mode("flex:dv=-3")
    assert harness.parse_mode("flex").run == RunConfig()  # 16 steps per device call
    assert harness.parse_mode("flex:spc=4").run.steps_per_call == 4
    assert harness.parse_mode("ar:cap=4096").cache_len == 4096
    with pytest.raises(ValueError, match="steps per call"):
        harness.parse_mode("flex:spc=x")
    s = harness.parse_mode("flex:host:la=0")
    assert (s.run.dispatch, s.run.lookahead) == ("host", 0)
    with pytest.raises(ValueError, match="lookahead"):
        harness.parse_mode("flex:la=x")


def test_turns_prompts_through_harness(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"turns": ["first question", "a follow-up"]}, {"prompt": "plain"}, {"turns": ["q3"]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    texts = loading.read_prompts((), str(path))
    assert texts == ["first question", "plain", "q3"]
    cfg, target, dcfg, draft = tiny()
    ids = [[1 + (ord(c) % 60) for c in t] for t in texts]  # a stand-in tokenizer
    res = harness.run_benchmark(
        cfg, target, None, draft, dcfg, ids, batch_sizes=(2,), modes=("paper:t=0",),
        max_new_tokens=6, output_dir=str(tmp_path / "out"), eos_ids=(), timing=PLAN,
        plots=False,
    )  # fmt: skip
    assert [r["mode"] for r in res["rows"]] == ["ar", "paper:t=0"]
    assert res["rows"][1]["threshold"] == 0.0 and "par2" in res["step_costs"]["2"]["relative"]
    assert res["rows"][1]["num_batches"] == 2 and res["rows"][1]["outputs_match_ar"]


def test_bad_input(tmp_path):
    cfg, target, dcfg, draft = tiny()
    with pytest.raises(ValueError, match="need a draft"):
        harness.run_benchmark(cfg, target, None, None, dcfg, PROMPTS, modes=("flex",),
                              output_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="duplicate"):
        harness.run_benchmark(cfg, target, None, draft, dcfg, PROMPTS, modes=("flex", "flex"),
                              output_dir=str(tmp_path))  # fmt: skip


def _run_launch(tmp_path, *extra):
    out = tmp_path / "bench"
    cmd = [
        sys.executable, os.path.join(REPO, "launch", "benchmark.py"), "--num_prompts=2",
        "--batch_sizes=1", "--max_new_tokens=8", "--modes=ar,flex", f"--output_dir={out}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / report.RESULTS_FILE) as f:
        return proc.stdout, json.load(f)


@pytest.mark.slow  # 75 s: the real target, end to end
def test_launch_benchmark_embedded(tmp_path):
    stdout, res = _run_launch(tmp_path, "--dataset=sharegpt")
    assert "speedup" in stdout and "step cost" in stdout
    assert res["config"]["prompts"] == "sharegpt" and res["config"]["chat"] is True
    assert {r["mode"] for r in res["rows"]} == {"ar", "flex"}
    assert all(r["outputs_match_ar"] for r in res["rows"])


@pytest.mark.slow
def test_launch_benchmark_turns_file_and_hf_baseline(tmp_path):
    path = tmp_path / "turns.jsonl"
    path.write_text(
        json.dumps({"turns": ["Write a Python function that adds two numbers.", "Now test it."]})
        + "\n"
        + json.dumps({"turns": ["Name three prime numbers."]})
        + "\n"
    )
    stdout, res = _run_launch(tmp_path, f"--prompts_file={path}", "--hf_baseline")
    assert res["config"]["chat"] is True
    hf = next(r for r in res["rows"] if r["mode"] == hf_peer.HF_MODE)
    assert hf["tokens_per_s"] > 0 and hf["speedup_vs_ar"] > 0
    assert hf["outputs_match_ar"]  # built from our parameters: the same model, the same tokens
    assert "hf_transformers" in stdout


def test_demo_stages_skip_finished_work(tmp_path):
    from flexdraft_jax.recipes import demo

    stages = demo.Stages(str(tmp_path))
    calls = []
    first = stages.run("distil", lambda: calls.append(1) or {"n": 3})
    again = demo.Stages(str(tmp_path)).run("distil", lambda: calls.append(2) or {"n": 4})
    assert calls == [1] and first["n"] == again["n"] == 3 and "stage_seconds" in again
    assert stages.done("attention") is None


def test_demo_plan_retrain_fits_budget():
    from flexdraft_jax.recipes import demo

    config = demo.load_config("configs/smollm2_135m.py")
    minutes = demo.plan_retrain(config, 40.0)
    assert sum(minutes.values()) == pytest.approx(40.0 - demo.BENCH_MINUTES)
    assert config.train.steps * demo.TRAIN_SECONDS_PER_STEP <= 60 * minutes["attention"] + 1e-6
    assert config.data.num_prompts * config.data.max_new_tokens <= (
        60 * minutes["distil"] * demo.DISTILL_TOKENS_PER_S + config.data.max_new_tokens
    )
    small = demo.load_config("configs/smollm2_135m.py:runlocal")
    demo.plan_retrain(small, 40.0)
    assert (small.train.steps, small.data.num_prompts) == (3, 16)  # never grows a config
    with pytest.raises(ValueError, match="budget_minutes"):
        demo.plan_retrain(demo.load_config("configs/smollm2_135m.py"), 5.0)


def test_rows_time_each_step_at_its_fastest_repeat():
    from flexdraft_jax.decoding.ar import Generation

    def gen(steps, branches=None, prefill=1.0):
        branches = branches or ["ar1"] * len(steps)
        stats = {
            "tokens": 20, "seconds": prefill + sum(steps), "prefill_seconds": prefill,
            "steps": len(steps), "step_seconds": steps, "branch_per_step": branches,
            "branch_counts": {b: branches.count(b) for b in set(branches)},
        }  # fmt: skip
        return Generation([[1] * 10, [2] * 10], stats)

    acc = bench_rows.Acc()
    # Batch 0: a burst of load hits a different step in each repeat; batch 1: the second repeat
    # took other branches, so its fastest whole decode counts.
    acc.add(gen([1.0, 5.0, 1.0], prefill=2.0), repeat=0, batch=0)
    acc.add(gen([4.0, 1.0, 1.5], prefill=1.0), repeat=1, batch=0)
    acc.add(gen([2.0, 2.0]), repeat=0, batch=1)
    acc.add(gen([1.0, 1.0, 1.0], ["seq2", "ar1", "ar1"]), repeat=1, batch=1)
    row = acc.row()
    assert row["repeat_seconds"] == [2.0 + 7.0 + 1.0 + 4.0, 1.0 + 6.5 + 1.0 + 3.0]
    assert row["batches_timed_stepwise"] == 1
    decode = (1.0 + 1.0 + 1.0) + 3.0  # batch 0 step by step, batch 1 its faster repeat
    prefill = 1.0 + 1.0
    assert row["tokens_per_s"] == pytest.approx((40 - 4) / decode)  # prefill excluded
    assert row["e2e_tokens_per_s"] == pytest.approx(40 / (decode + prefill))
    assert row["fastest_repeat_tokens_per_s"] == pytest.approx((40 - 4) / (11.5 - 2.0))
    assert row["step_seconds"] == pytest.approx(decode / 5)  # steps of one pass
    # Counts are of one pass (each batch's first decode), not summed over repeats.
    assert (row["steps"], row["tokens"], row["branch_counts"]) == (5, 40, {"ar1": 5})
    assert row["seconds"] == pytest.approx(decode + prefill)


def test_median_interval_is_the_order_statistics_with_their_coverage():
    x = np.arange(1.0, 11.0)  # n = 10: (x2, x9) holds the median w.p. 1 - 2 * 11/1024
    assert bench_rows.median_interval(x, 0.9) == (2.0, 9.0, pytest.approx(1 - 22 / 1024))
    assert bench_rows.median_interval(x, 0.5)[:2] == (4.0, 7.0)  # 1 - 2 * 176/1024 >= 0.5
    lo, hi, cover = bench_rows.median_interval(np.array([1.0, 2.0, 3.0, 4.0]), 0.9)
    assert (lo, hi, cover) == (1.0, 4.0, 0.875)  # too few for 90%: the range, and its coverage
    # Its coverage is what it claims: medians of 5 draws of a known distribution.
    rng = np.random.default_rng(0)
    draws = np.sort(rng.lognormal(0.0, 0.2, size=(4000, 8)), axis=1)
    spans = [bench_rows.median_interval(d, 0.9) for d in draws]
    hit = np.mean([lo <= 1.0 <= hi for lo, hi, _ in spans])  # the median of lognormal(0, s) is 1
    assert abs(hit - spans[0][2]) < 0.02, (hit, spans[0][2])


def test_paired_speedup_compares_rounds_side_by_side():
    """Round r of a mode against AR's round r: a slow phase covering both cancels, where each
    mode's fastest repeat would compare different phases."""
    from flexdraft_jax.decoding.ar import Generation

    def gen(seconds, prefill=0.5):
        stats = {"tokens": 20, "seconds": prefill + seconds, "prefill_seconds": prefill,
                 "steps": 9, "step_seconds": [seconds / 9] * 9}  # fmt: skip
        return Generation([[1] * 10, [2] * 10], stats)

    ar, flex = bench_rows.Acc(), bench_rows.Acc()
    phases = [1.0, 2.0, 1.5, 3.0, 1.2]  # the machine's speed round by round
    for r, slow in enumerate(phases):
        for batch in (0, 1):
            ar.add(gen(1.0 * slow), repeat=r, batch=batch)
            flex.add(gen(0.8 * slow), repeat=r, batch=batch)  # 1.25x faster in every round
    flex.add(gen(0.1), repeat=5, batch=0)  # a round without every batch does not count
    got = bench_rows.paired_speedup(flex, ar)
    assert got["paired_rounds"] == 5
    assert got["paired_speedup_vs_ar"] == pytest.approx(1.25)
    assert got["paired_interval"] == pytest.approx([1.25, 1.25])
    assert got["paired_coverage"] == pytest.approx(1 - 2 / 32)
    # Rounds that disagree: AR's time over the mode's, each summed over the rounds; the range
    # is that of the per-round ratios (all five: fewer would cover under 90%).
    odd = bench_rows.Acc()
    for r, (slow, f) in enumerate(zip(phases, [0.8, 1.0, 0.5, 0.8, 2.0])):
        for batch in (0, 1):
            odd.add(gen(f * slow), repeat=r, batch=batch)
    got = bench_rows.paired_speedup(odd, ar)
    assert got["paired_speedup_vs_ar"] == pytest.approx(8.7 / (0.8 + 2.0 + 0.75 + 2.4 + 2.4))
    mean_ar, mean_odd = 2 * 8.7 / 5, 2 * 8.35 / 5  # a round's two batches, each prefilled in 0.5 s
    assert got["paired_e2e_speedup_vs_ar"] == pytest.approx((1.0 + mean_ar) / (1.0 + mean_odd))
    assert got["paired_interval"] == pytest.approx([0.5, 2.0])
    assert bench_rows.paired_speedup(odd, ar, level=0.95)["paired_interval"] is None
    assert bench_rows.paired_speedup(flex, bench_rows.Acc())["paired_interval"] is None


def test_demo_retrain_runs_every_stage_then_skips_them(tmp_path, monkeypatch):
    """`--retrain` end to end on the tiny target: distil, attention, calibration; the release it
    returns decodes losslessly; a rerun of the same workdir trains nothing."""
    from flexdraft_jax.checkpoints import release
    from flexdraft_jax.decoding import ar
    from flexdraft_jax.decoding.decoder import Decoder
    from flexdraft_jax.decoding.engine import EngineConfig
    from flexdraft_jax.recipes import demo

    conf = demo.load_config("configs/tiny.py")
    cfg = ModelConfig(**dict(conf.model.tiny))
    params = jax.tree.map(np.asarray, tf.init_target(cfg, jax.random.PRNGKey(0)))
    target = (cfg, params, None)
    wd, budget = str(tmp_path), demo.BENCH_MINUTES + 3.0
    path = demo.retrain(wd, demo.Stages(wd), target, "configs/tiny.py", budget)
    for stage in ("distil", "attention", "calibration"):
        assert os.path.exists(tmp_path / "stages" / f"{stage}.json")
    assert demo.Stages(wd).done("calibration")["release"] == path

    dcfg, draft = release.load_release(path, cfg)
    prompts = [[3, 5, 7, 9], [11, 2]]
    want = ar.generate(cfg, params, prompts, 12).tokens
    dec = Decoder(cfg, params, draft, dcfg, EngineConfig(mode="sequential"))
    assert dec.generate(prompts, 12).tokens == want

    def no_training(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("flexdraft_jax.training.trainer.train", no_training)
    monkeypatch.setattr("flexdraft_jax.training.trainer.build_dataset", no_training)
    assert demo.retrain(wd, demo.Stages(wd), target, "configs/tiny.py", budget) == path


@pytest.mark.slow  # 64 s: the real target, both prompt sets
def test_demo_benchmarks_code_and_chat_then_skips_them(tmp_path):
    """The demo on the embedded target and shipped draft, shrunk to one prompt at batch 1: a
    benchmark per prompt set (every mode on HumanEval, AR and flex on held-out ShareGPT), all
    outputs equal to AR's; a rerun with the same settings measures nothing again."""
    from flexdraft_jax.recipes import demo

    over = dict(num_prompts=1, batch_sizes=(1,), max_new_tokens=6, repeats=1, profile_repeats=1)
    res = demo.run_demo(str(tmp_path), bench_overrides=over, hf_baseline=False)
    assert set(res) == {"humaneval", "sharegpt", "demo_seconds"}
    modes = {k: [r["mode"] for r in res[k]["rows"]] for k in ("humaneval", "sharegpt")}
    assert modes == {
        "humaneval": ["ar", "sequential", "parallel", "flex"],
        "sharegpt": ["ar", "flex"],
    }
    assert res["sharegpt"]["config"]["prompts"].startswith("sharegpt, the 1 shortest")
    assert all(r["outputs_match_ar"] for k in modes for r in res[k]["rows"])
    assert os.path.exists(tmp_path / "benchmark_sharegpt" / report.RESULTS_FILE)

    results = [tmp_path / d / report.RESULTS_FILE for d in ("benchmark", "benchmark_sharegpt")]
    written = [os.stat(p).st_mtime_ns for p in results]
    again = demo.run_demo(str(tmp_path), bench_overrides=over, hf_baseline=False)
    assert again["sharegpt"]["rows"] == res["sharegpt"]["rows"]
    assert [os.stat(p).st_mtime_ns for p in results] == written  # nothing measured again
