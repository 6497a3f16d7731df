"""A benchmark row: one mode's decodes at one batch size, summed and timed (DESIGN §5).

`Acc` collects the decodes (every repeat of every batch) and turns them into a row: tau and
per-position acceptance, counts of one pass over the batches, and decode speed with each step at
its fastest repeat. `speed_fields` and `speedups` are the speed columns every row shares, the
`transformers` peer's included; `paired_speedup` is the speed over AR's round by round, with the
interval that shows how finely the run resolves it.
"""

from __future__ import annotations

import math

import numpy as np


class Acc:
    """Sums the stats of one mode's decodes at one batch size (one pass over the batches), and
    times them robustly.

    Repeats decode the same batch with the same seed (mostly from one prefilled state), so they
    take the same steps (checked by the branch each step ran). A row's decode time is, batch by
    batch, the sum over steps of each step's fastest repeat: on a shared machine, load from
    elsewhere comes in bursts of seconds that only ever add time, and it must hit the same step
    in every repeat to count. Where the repeats' steps differ, the batch counts its fastest
    whole decode."""

    def __init__(self):
        self.seq_steps, self.committed, self.spec_steps = 0, 0, 0
        self.acc_weighted, self.branch_counts = None, {}
        self.outputs_by_batch: dict[int, dict[int, list]] = {}  # batch -> repeat -> tokens
        self.decodes: dict[int, dict[int, dict]] = {}  # batch -> repeat -> one decode

    def add(self, gen, repeat: int = 0, batch: int = 0):
        s = gen.stats
        self.decodes.setdefault(batch, {})[repeat] = {
            "seconds": s["seconds"],
            "prefill": s.get("prefill_seconds", 0.0),
            "steps": s.get("step_seconds"),
            "branches": s.get("branch_per_step"),
            "n_steps": s["steps"],
            "tokens": s["tokens"],
            "sequences": len(gen.tokens),
        }
        self.outputs_by_batch.setdefault(batch, {})[repeat] = list(gen.tokens)
        if repeat:  # the same steps again (same seed): counted once, from the first decode
            return
        per_seq = np.asarray(s.get("committed_per_step") or [[]])
        # An active sequence commits >= 1 token per step, so nonzero entries are its steps.
        self.seq_steps += int((per_seq > 0).sum())
        self.committed += int(per_seq.sum())
        ppa = np.asarray(s.get("per_position_acceptance", []), np.float64)
        # Weighted by speculative steps: an AR step verifies nothing (flex may take only those).
        w = sum(v for k, v in s.get("branch_counts", {}).items() if not k.startswith("ar"))
        self.spec_steps += w
        if ppa.size and w:
            self.acc_weighted = (
                ppa * w if self.acc_weighted is None else self.acc_weighted + ppa * w
            )
        for k, v in s.get("branch_counts", {}).items():
            self.branch_counts[k] = self.branch_counts.get(k, 0) + v

    @property
    def outputs(self) -> list:
        """The first repeat's outputs, batch after batch."""
        return [t for i in sorted(self.outputs_by_batch) for t in self.outputs_by_batch[i][0]]

    def same_outputs(self, reference: list) -> bool:
        """Every repeat of every batch decoded `reference`'s tokens (`outputs` of another)."""
        start, same = 0, True
        for i in sorted(self.outputs_by_batch):
            reps = self.outputs_by_batch[i]
            ref = reference[start : start + len(reps[0])]
            start += len(reps[0])
            same = same and all(out == ref for out in reps.values())
        return same and start == len(reference)

    def one_pass(self, before: int | None = None) -> dict:
        """One pass over the batches: tokens, sequences and steps (of each batch's first decode);
        prefill seconds; decode seconds step by step and by the fastest whole decode (see the
        class docstring); and how many batches were timed step by step. `before`: only the
        repeats numbered below it."""
        out = dict(tokens=0, sequences=0, steps=0, prefill=0.0, decode=0.0, whole=0.0, stepwise=0)
        for reps in self.decodes.values():
            runs = [reps[r] for r in sorted(reps) if before is None or r < before]
            for k, f in (("tokens", "tokens"), ("sequences", "sequences"), ("steps", "n_steps")):
                out[k] += runs[0][f]
            out["prefill"] += min(r["prefill"] for r in runs)
            whole = min(r["seconds"] - r["prefill"] for r in runs)
            out["whole"] += whole
            steps = [r["steps"] for r in runs]
            aligned = all(s is not None and len(s) == len(steps[0]) for s in steps) and all(
                r["branches"] == runs[0]["branches"] for r in runs
            )
            if aligned and steps[0]:
                out["decode"] += float(np.min(np.asarray(steps, np.float64), axis=0).sum())
                out["stepwise"] += 1
            else:
                out["decode"] += whole
        return out

    def round_seconds(self) -> dict[int, float]:
        """Decode seconds (prefill excluded) of each repeat that decoded every batch: one pass
        over the batches per round."""
        reps = list(self.decodes.values())
        common = set.intersection(*(set(r) for r in reps)) if reps else set()
        return {r: sum(d[r]["seconds"] - d[r]["prefill"] for d in reps) for r in sorted(common)}

    def repeats(self) -> int:
        """Repeats recorded (of the batch with the most)."""
        return max((len(reps) for reps in self.decodes.values()), default=0)

    def row(self) -> dict:
        ppa = [] if self.acc_weighted is None else (self.acc_weighted / self.spec_steps).tolist()
        p = self.one_pass()
        repeat_seconds = {}
        for reps in self.decodes.values():
            for r, d in reps.items():
                repeat_seconds[r] = repeat_seconds.get(r, 0.0) + d["seconds"]
        tokens, sequences, prefill = p["tokens"], p["sequences"], p["prefill"]
        speed = speed_fields(tokens, prefill + p["decode"], prefill, sequences)
        plain = speed_fields(tokens, prefill + p["whole"], prefill, sequences)
        # Counts are of one pass over the batches (repeats take the same steps); seconds are
        # the pass as timed (each step at its fastest repeat).
        return {
            "tau": self.committed / self.seq_steps if self.seq_steps else 1.0,
            "per_position_acceptance": ppa,
            "tokens": tokens,
            "seconds": prefill + p["decode"],
            "prefill_seconds": prefill,
            "steps": p["steps"],
            "speculative_steps": self.spec_steps,
            "branch_counts": self.branch_counts,
            **speed,
            "repeat_seconds": [v for _, v in sorted(repeat_seconds.items())],
            # The plain estimate beside the step-wise one: each batch's fastest whole decode.
            "fastest_repeat_tokens_per_s": plain["tokens_per_s"],
            "batches_timed_stepwise": p["stepwise"],
            # Decode step at the row's timing, to hold against the profile's forced steps.
            "step_seconds": p["decode"] / max(p["steps"], 1),
        }


def paired_speedup(acc: Acc, ar: Acc, level: float = 0.9) -> dict:
    """Speed over AR's from the rounds both decoded every batch in (flex: decoded in turns with
    AR, step by step, so a slow phase of the machine weighs on both alike): AR's decode seconds
    per token over the mode's, each summed over those rounds (e2e: with each one's prefill, its
    fastest, added to its mean round); and the range of the per-round ratios that holds their
    median with probability `coverage` >= `level` (`median_interval`; None before 5 rounds, too
    few for 90%). The range shows how finely the run resolves it."""
    mine, base = acc.round_seconds(), ar.round_seconds()
    rounds = sorted(mine.keys() & base.keys())
    if not rounds:
        return {"paired_speedup_vs_ar": None, "paired_e2e_speedup_vs_ar": None,
                "paired_interval": None, "paired_coverage": None, "paired_rounds": 0}  # fmt: skip
    p, q = acc.one_pass(), ar.one_pass()
    tok, ar_tok = max(p["tokens"] - p["sequences"], 1), max(q["tokens"] - q["sequences"], 1)
    speed = lambda a, x: (a / ar_tok) / max(x / tok, 1e-12)
    ratios = np.sort([speed(base[r], mine[r]) for r in rounds])
    lo, hi, coverage = median_interval(ratios, level)
    a, x = sum(base[r] for r in rounds) / len(rounds), sum(mine[r] for r in rounds) / len(rounds)
    e2e = (
        (q["prefill"] + a)
        / max(q["tokens"], 1)
        / max((p["prefill"] + x) / max(p["tokens"], 1), 1e-12)
    )
    return {
        "paired_speedup_vs_ar": speed(a, x),
        "paired_e2e_speedup_vs_ar": e2e,
        "paired_interval": [lo, hi] if coverage >= level else None,
        "paired_coverage": coverage,
        "paired_rounds": len(rounds),
    }


def median_interval(x, level: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free interval for the median of samples `x` (sorted): the order statistics
    (x_k, x_{n+1-k}) with the largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at
    least `level`; with too few samples for that, the full range. Returns (low, high, coverage)."""
    n = len(x)
    below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2.0**n  # P(Bin(n, 1/2) < k)
    k = 1
    while k < (n + 1) // 2 and 1 - 2 * below(k + 1) >= level:
        k += 1
    return float(x[k - 1]), float(x[n - k]), 1 - 2 * below(k)


def speed_fields(tokens: int, seconds: float, prefill_seconds: float, sequences: int) -> dict:
    """Decode speed (the prefill and the first token it yields excluded) and end to end."""
    dec_tok, dec_s = max(tokens - sequences, 0), max(seconds - prefill_seconds, 0.0)
    return {
        "tokens_per_s": dec_tok / dec_s if dec_s > 0 else 0.0,
        "seconds_per_token": dec_s / max(dec_tok, 1),
        "e2e_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "e2e_seconds_per_token": seconds / max(tokens, 1),
    }


def speedups(row: dict, ar_row: dict) -> dict:
    return {
        "speedup_vs_ar": ar_row["seconds_per_token"] / max(row["seconds_per_token"], 1e-12),
        "e2e_speedup_vs_ar": ar_row["e2e_seconds_per_token"]
        / max(row["e2e_seconds_per_token"], 1e-12),
    }
