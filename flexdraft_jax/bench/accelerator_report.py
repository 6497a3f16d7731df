"""The accelerator check's record for people: a summary, markdown tables and plots.

summary(record)               the numbers the check is for: kernel agreement, the cost of the
                              largest row bucket against one AR step per shape and batch size,
                              flex's speedup over AR per batch size, training's outcome
format_markdown(record)       accelerator_check.md: the summary, then every section's table
write_outputs(record, dir)    the markdown and one figure (the step costs per shape, the
                              decoding speedups)
"""

from __future__ import annotations

import math
import os

MARKDOWN_FILE = "accelerator_check.md"
PLOT_FILE = "accelerator_check.png"


def _section(record: dict, name: str) -> dict | None:
    sec = record.get("sections", {}).get(name)
    return None if sec is None else sec.get("result")


def _widest(names, kind: str) -> str | None:
    rows = [n for n in names if n.startswith(kind)]
    return max(rows, key=lambda n: int(n[len(kind) :]), default=None)


def summary(record: dict) -> dict:
    out = {}
    kern = _section(record, "kernels")
    if kern:
        worst = {}
        for c in kern["cases"]:
            key = f"{c['direction']} {c['dtype']}"
            worst[key] = max(worst.get(key, 0.0), c["max_err"])
        out["kernels"] = {
            "cases": len(kern["cases"]),
            "within_tolerance": sum(c["ok"] for c in kern["cases"]),
            "failed": len(kern["failed"]),
            "max_err": worst,
            "interpret": kern["interpret"],
        }
    steps = _section(record, "step_costs")
    if steps:
        rows = []
        for r in steps["results"]:
            if r["status"] != "measured":
                continue
            seq, par = _widest(r["relative"], "seq"), _widest(r["relative"], "par")
            rows.append(
                {
                    "shape": r["shape"],
                    "impl": r["impl"],
                    "batch": r["batch"],
                    "ar_ms": 1e3 * r["seconds"]["ar1"],
                    seq: r["relative"][seq],
                    par: r["relative"][par],
                }
            )
        out["widest_step_vs_ar"] = rows
    dec = _section(record, "decoding")
    if dec:
        out["flex_vs_ar"] = {
            str(r["batch_size"]): {
                "speedup": r["speedup_vs_ar"],
                "tau": r["tau"],
                "match": r["match_rate_vs_ar"],
            }
            for r in dec["rows"]
            if r["engine_mode"] == "flex"
        }
    train = _section(record, "train")
    if train:
        last = train["heldout"][-1] if train["heldout"] else {}
        out["train"] = {
            "steps": train["steps"],
            "prompts_asked": train["prompts_asked"],
            "sequences": train["data"]["sequences"],
            "heldout_tau": last.get("heldout_tau"),
        }
    return out


def _f(x, fmt: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _table(head: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _kernels_md(kern: dict) -> list[str]:
    mode = "Pallas interpreter (CPU)" if kern["interpret"] else f"{kern['kernel']} kernel, compiled"
    lines = [f"## Kernels ({mode}) against the jnp reference", ""]
    rows = [
        [
            c["direction"],
            c["layout"],
            c["heads"],
            c["dtype"],
            "x".join(str(c["shape"][k]) for k in ("B", "T", "S", "N", "K", "D")),
            f"{c['max_err']:.1e}",
            f"{c['max_err_exact']:.1e}",
            f"{c['tolerance']:.0e}",
            "yes" if c["ok"] else "**NO**",
        ]
        for c in kern["cases"]
    ]
    head = ["pass", "layout", "heads", "dtype", "BxTxSxNxKxD", "max err", "vs exact", "tol", "ok"]
    lines += _table(head, rows)
    if kern["timings"]:
        lines += ["", "Kernel vs reference time (bfloat16, median ms):", ""]
        rows = [
            [
                t["layout"],
                t["heads"],
                "x".join(str(t["shape"][k]) for k in ("B", "T", "S")),
                _f(t["kernel_ms"], ".3f"),
                _f(t["reference_ms"], ".3f"),
                _f(t["speedup"]),
                _f(t["tile_density"]),
            ]
            for t in kern["timings"]
        ]
        lines += _table(
            ["layout", "heads", "BxTxS", "kernel", "reference", "speedup", "tiles"], rows
        )
    for what in ("failed", "skipped"):
        for item in kern[what]:
            lines.append(f"- {what}: {item['case']}: {item.get('error') or item.get('reason')}")
    return lines


def _steps_md(steps: dict) -> list[str]:
    lines = [
        "## Step cost of each branch (seconds per step / one AR step)",
        "",
        f"Random weights in {steps['plan']['dtype']}, block {steps['plan']['block_size']}, "
        f"cache {steps['plan']['cache_len']} (context {min(256, steps['plan']['cache_len'] // 4)}"
        f"), draft vocabulary {steps['plan']['draft_vocab'] or 'all'}; `Decoder.measure` (each "
        "branch forced, fastest of its rounds).",
        "",
    ]
    measured = [r for r in steps["results"] if r["status"] == "measured"]
    names = []
    for r in measured:
        names += [n for n in r["relative"] if n not in names]
    rows = [
        [r["shape"], r["impl"], r["batch"], _f(1e3 * r["seconds"]["ar1"], ".2f")]
        + [_f(r["relative"].get(n)) for n in names if n != "ar1"]
        + [_f(r["step_memory_gib"], ".1f"), _f(r["compile_seconds"], ".0f")]
        for r in measured
    ]
    head = ["shape", "attention", "batch", "AR ms"] + [n for n in names if n != "ar1"]
    lines += _table(head + ["step GiB", "compile s"], rows)
    for r in steps["results"]:
        if r["status"] != "measured":
            lines.append(
                f"- {r['status']}: {r['shape']} {r['impl']} batch {r['batch']}: {r['reason'][:300]}"
            )
    return lines


def _decoding_md(dec: dict) -> list[str]:
    lines = [
        "## Decoding",
        "",
        f"{dec['model']}; {dec['prompts']} prompts, {dec['plan']['max_new_tokens']} new "
        f"tokens, greedy, {dec['plan']['dtype']}, attention {dec['plan']['attention_impl']}; "
        "match: share of AR's tokens reproduced (same dtype).",
        "",
    ]
    rows = [
        [
            r["mode"],
            r["batch_size"],
            _f(r["tau"]),
            _f(r["tokens_per_s"], ".0f"),
            f"{_f(r['speedup_vs_ar'])}x",
            _f(r["match_rate_vs_ar"], ".3f"),
            " ".join(f"{k}:{v}" for k, v in r["branch_counts"].items() if v),
        ]
        for r in sorted(dec["rows"], key=lambda r: r["batch_size"])
    ]
    lines += _table(["mode", "batch", "tau", "tok/s", "speedup", "match", "branches"], rows)
    for item in dec["skipped"]:
        lines.append(f"- skipped: batch {item['batch_size']}: {item['reason']}")
    return lines


def _train_md(train: dict) -> list[str]:
    lines = [
        "## Training on the device",
        "",
        f"{train['steps']} steps (planned {train['steps_planned']}) in "
        f"{train['seconds'] / 60:.1f} min; {train['data']['sequences']} sequences, "
        f"{train['data']['response_tokens']} response tokens ({train['prompts_asked']} prompts "
        f"asked, {train['data_scale']}x the recipe's {train['recipe_prompts']}); median step "
        f"{_f(train['median_step_seconds'], '.3f')} s.",
        "",
    ]
    rows = [
        [
            h["step"],
            _f(h["train_minutes"]),
            _f(h["heldout_tau"], ".3f"),
            _f(h["heldout_decoded_tau"], ".3f"),
        ]
        for h in train["heldout"]
    ]
    if rows:
        lines += _table(["step", "minutes", "held-out tau", "decoded tau"], rows) + [""]
    files = ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in train["export"]["files"].items())
    lines.append(f"Exported to draft_release/: {files}.")
    if train["export"]["manifests"]:
        lines.append(
            "Join it: `python -m flexdraft_jax.checkpoints.parts join_folder DIR/draft_release`."
        )
    return lines


def format_markdown(record: dict) -> str:
    dev = record["device"]
    lines = [
        f"# Accelerator check: {dev['device_count']}x {dev['device_kind']} ({dev['platform']})",
        "",
        f"{record['created']}; jax {dev['jax']}, Python {dev['python']}, {dev['host_cores']} host "
        f"cores; commit {dev.get('commit') or 'unknown'}; "
        f"{record.get('wall_seconds', 0.0) / 60:.1f} min.",
        "",
    ]
    lines += _table(
        ["section", "status", "seconds", "reason"],
        [
            [n, s["status"], f"{s['seconds']:.0f}", (s["reason"] or "")[:200].replace("|", "/")]
            for n, s in record["sections"].items()
        ],
    )
    s = record.get("summary", {})
    if "kernels" in s:
        k = s["kernels"]
        worst = ", ".join(f"{key} {v:.1e}" for key, v in k["max_err"].items())
        lines += [
            "",
            f"**Kernels**: {k['within_tolerance']}/{k['cases']} cases within "
            f"tolerance, {k['failed']} failed; largest errors: {worst}.",
        ]
    if s.get("flex_vs_ar"):
        parts = [
            f"batch {b}: {_f(v['speedup'])}x (tau {_f(v['tau'])}, match {_f(v['match'], '.3f')})"
            for b, v in s["flex_vs_ar"].items()
        ]
        lines += ["", "**Flex over AR**: " + "; ".join(parts) + "."]
    builders = {
        "kernels": _kernels_md,
        "decoding": _decoding_md,
        "step_costs": _steps_md,
        "train": _train_md,
    }
    for name, build in builders.items():
        result = _section(record, name)
        if result:
            try:
                lines += [""] + build(result)
            except Exception as e:  # the JSON record holds the numbers either way
                lines += ["", f"## {name}: no table ({type(e).__name__}: {e})"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _step_panel(ax, measured: list, shape: str) -> None:
    """The widest sequential and parallel step / an AR step against batch size, per attention."""
    for impl, style in (("pallas", "-"), ("xla", "--")):
        rows = sorted(
            (r for r in measured if r["shape"] == shape and r["impl"] == impl),
            key=lambda r: r["batch"],
        )
        for kind, marker in (("seq", "o"), ("par", "s")):
            name = _widest(rows[0]["relative"], kind) if rows else None
            if name:
                ys = [r["relative"][name] for r in rows]
                ax.plot([r["batch"] for r in rows], ys, style + marker, label=f"{name} {impl}")
    ax.set_title(f"{shape}: step cost")
    ax.set_ylabel("step time / AR step")


def _decoding_panel(ax, rows: list) -> None:
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["batch_size"], r["speedup_vs_ar"]) for r in rows if r["mode"] == mode)
        style = "k--" if mode == "ar" else "o-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mode)
    ax.set_title("decoding: speedup over AR")
    ax.set_ylabel("AR time per token / mode's")


def plot(record: dict, path: str) -> str | None:
    """One figure: a step-cost panel per target shape, then the decoding speedups (one file, as a
    device call brings back only a few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, dec = _section(record, "step_costs"), _section(record, "decoding")
    measured = [r for r in (steps or {}).get("results", []) if r["status"] == "measured"]
    shapes = list(dict.fromkeys(r["shape"] for r in measured))
    panels = [lambda ax, s=s: _step_panel(ax, measured, s) for s in shapes]
    if dec and dec["rows"]:
        panels.append(lambda ax: _decoding_panel(ax, dec["rows"]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, draw in zip(axes[0], panels):
        draw(ax)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.axhline(1.0, color="grey", lw=0.5)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(record: dict, output_dir: str) -> dict:
    """accelerator_check.md and accelerator_check.png; a plot that fails is noted, not raised."""
    out = {}
    try:
        path = plot(record, os.path.join(output_dir, PLOT_FILE))
    except Exception as e:  # a plot is a convenience: the record holds the numbers
        out["plot"] = f"failed: {type(e).__name__}: {e}"
    else:
        if path:
            out["plot"] = PLOT_FILE
    with open(os.path.join(output_dir, MARKDOWN_FILE), "w") as f:
        f.write(format_markdown(record))
    out["markdown"] = MARKDOWN_FILE
    return out
