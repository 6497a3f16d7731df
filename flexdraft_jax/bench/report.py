"""Benchmark output: a table for people, results.json for machines, PNG plots (DESIGN §5).

format_table(results)        mode x batch: tau, tokens/s, speedup over AR, greedy match
format_step_costs(results)   per batch size: each branch's step time relative to an AR step
write_results(results, dir)  results.json, written atomically
plot_all(results, dir)       speedup vs batch size, acceptance per draft position, step costs
"""

from __future__ import annotations

import os

from flexdraft_jax.common import write_json_atomic

RESULTS_FILE = "results.json"


def _modes(rows) -> list[str]:
    seen = []
    for r in rows:
        if r["mode"] not in seen:
            seen.append(r["mode"])
    return seen


def _batches(rows) -> list[int]:
    return sorted({r["batch_size"] for r in rows})


def _fmt_match(m) -> str:
    return "-" if m is None else ("yes" if m else "NO")


def format_table(results: dict) -> str:
    """One line per (mode, batch size). tok/s and speedup: decode phase; paired: the range that
    holds the round-by-round speedup's median (`rows.paired_speedup`), the run's resolution; e2e:
    with the prefill; step: the mode's mean decode step / AR's."""
    rows = results["rows"]
    head = (
        f"{'mode':<18}{'batch':>6}{'tau':>7}{'tok/s':>10}{'speedup':>9}{'paired':>11}{'e2e':>8}"
        f"{'step':>7}{'match':>7}  branches"
    )
    lines = [head, "-" * len(head)]
    for bs in _batches(rows):
        for mode in _modes(rows):
            for r in rows:
                if r["mode"] != mode or r["batch_size"] != bs:
                    continue
                counts = r.get("branch_counts") or {}
                br = " ".join(f"{k}:{v}" for k, v in counts.items() if v) if len(counts) > 1 else ""
                step = r.get("step_seconds_vs_ar")
                span = r.get("paired_interval")
                span = "-" if not span else f"{span[0]:.2f}-{span[1]:.2f}"
                lines.append(
                    f"{mode:<18}{bs:>6}{r['tau']:>7.2f}{r['tokens_per_s']:>10.1f}"
                    f"{r['speedup_vs_ar']:>8.2f}x{span:>11}"
                    f"{r.get('e2e_speedup_vs_ar', float('nan')):>7.2f}x"
                    f"{'-' if step is None else f'{step:.2f}':>7}"
                    f"{_fmt_match(r['outputs_match_ar']):>7}  {br}"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_step_costs(results: dict) -> str:
    """Per batch size: each branch's step time / an AR step, with its (shallow, deep) rows."""
    costs = results.get("step_costs") or {}
    if not costs:
        return ""
    lines = ["step cost relative to one AR step (rows through shallow/deep layers):"]
    for bs, c in sorted(costs.items(), key=lambda kv: int(kv[0])):
        parts = []
        for name, rel in c["relative"].items():
            rows = c["rows"].get(name)
            parts.append(f"{name} {rel:.2f}" + (f" ({rows[0]}/{rows[1]})" if rows else ""))
        ar_ms = 1000 * c["seconds"].get("ar1", float("nan"))
        lines.append(f"  batch {bs:>3} (AR step {ar_ms:.1f} ms): " + ", ".join(parts))
        if "flex_ar1_over_ar_mode" in c:
            lines.append(
                f"            flex engine's ar1 / ar mode's step "
                f"({1000 * c['ar_mode_step_seconds']:.1f} ms): {c['flex_ar1_over_ar_mode']:.2f}"
            )
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str) -> str:
    return write_json_atomic(os.path.join(output_dir, RESULTS_FILE), results)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(results: dict, path: str) -> str:
    plt = _pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in _modes(rows):
        pts = sorted((r["batch_size"], r["speedup_vs_ar"]) for r in rows if r["mode"] == mode)
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "o-" if mode != "ar" else "k--", label=mode
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over AR (time per token)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_title(f"speedup vs batch size (T={results['config'].get('temperature', 0)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_acceptance(results: dict, path: str) -> str:
    """Acceptance of each draft position given the ones before it: one line per mode, averaged
    over batch sizes by speculative steps (rows that never speculated are left out)."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in _modes(results["rows"]):
        rows = [
            r for r in results["rows"] if r["mode"] == mode and r.get("per_position_acceptance")
        ]
        w = np.array([r.get("speculative_steps", r.get("steps", 1)) for r in rows], float)
        if not rows or w.sum() == 0:
            continue
        ppa = np.array([r["per_position_acceptance"] for r in rows])
        mean = (ppa * w[:, None]).sum(0) / w.sum()
        tau = sum(r["tau"] * wi for r, wi in zip(rows, w)) / w.sum()
        ax.plot(range(1, len(mean) + 1), mean, "o-", ms=3, label=f"{mode} (tau {tau:.2f})")
    ax.set_xlabel("draft position")
    ax.set_ylabel("conditional acceptance")
    ax.set_ylim(0, 1)
    ax.set_title("acceptance per draft position")
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_step_costs(results: dict, path: str) -> str:
    """Each branch's step time relative to an AR step, one line per batch size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    costs = results.get("step_costs") or {}
    names = []
    for c in costs.values():
        names += [n for n in c["relative"] if n not in names]
    for bs, c in sorted(costs.items(), key=lambda kv: int(kv[0])):
        ax.plot(
            range(len(names)),
            [c["relative"].get(n, float("nan")) for n in names],
            "o-",
            label=f"batch {bs}",
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("step time / AR step")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_title("measured step cost per branch")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: dict, output_dir: str) -> dict:
    out = {
        "speedup": plot_speedup(results, os.path.join(output_dir, "speedup.png")),
        "acceptance": plot_acceptance(results, os.path.join(output_dir, "acceptance.png")),
    }
    if results.get("step_costs"):
        out["step_cost"] = plot_step_costs(results, os.path.join(output_dir, "step_cost.png"))
    return out
