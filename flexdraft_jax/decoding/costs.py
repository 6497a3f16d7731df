"""Cost profiles: what each branch of a decode step costs, the input of the flex policy.

A `CostProfile` holds seconds per step of each branch at one batch size (and the draft pass a
speculative step runs first after an AR step). Profiles are explicit: measured on request
(`Decoder.measure`, by the benchmark, the launch scripts' `--profile`, or the user), saved and
loaded as JSON (`save` / `load`, atomically written), or estimated from parameter bytes and FLOPs
(`estimate`) when none is given. A plain `Decoder.generate` never times anything.

The estimate: a forward pass reads each weight once and spends 2 FLOPs per weight per row, so a
layer costs `bytes + 2 * params * rows / RIDGE` in units of byte reads, RIDGE being the device's
FLOPs per byte of memory bandwidth (`RIDGE`: about 4 on a 2-core CPU, where 8 rows cost ~1.8 one
row; ~200 on TPU v5e/v5p and H100/H200, where a few hundred rows cost what one does). Mask rows in
the deep layers read the draft's attention projectors too; each sequence reads its cache window
(`CONTEXT` slots assumed) once per layer, and each row spends attention FLOPs over it. It ranks
branches, not seconds: a measured profile replaces it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from flexdraft_jax.common import write_json_atomic
from flexdraft_jax.models.config import DraftConfig, ModelConfig

# FLOPs per byte of memory bandwidth, by JAX backend (the estimate's compute-vs-memory balance).
RIDGE = {"cpu": 4.0, "gpu": 200.0, "tpu": 200.0}
CONTEXT = 256  # cache slots each row attends to, for the estimate
# Where launch scripts keep measured profiles (`--profile=auto`), one file per machine, model,
# draft shape and batch size.
DEFAULT_STORE = os.path.join(os.path.expanduser("~"), ".cache", "flexdraft_jax", "profiles")


def branch_name(branch) -> str:
    return f"{branch[0]}{branch[1]}"


def branch_rows(branch: tuple[str, int], block_size: int) -> tuple[int, int]:
    """(rows through the shallow layers, rows through the deep layers) of one branch."""
    kind, r = branch
    if kind == "ar":
        return 1, 1
    if kind == "seq":
        return r, r + block_size
    return r, r + r * block_size


@dataclasses.dataclass
class CostProfile:
    """Seconds per step of each branch at one batch size; `draft_pass` is the refill cost.
    `source`: "measured" or "estimate"."""

    batch_size: int
    branches: dict[str, float]  # "ar1", "seq4", "par8", ...
    draft_pass: float
    rows: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    source: str = "measured"

    def costs(self, branches) -> np.ndarray:
        missing = [branch_name(b) for b in branches if branch_name(b) not in self.branches]
        if missing:
            raise ValueError(f"cost profile has no entry for branches {missing}")
        return np.array(
            [self.branches[branch_name(b)] for b in branches] + [self.draft_pass], np.float32
        )

    def unit(self) -> float:
        """Seconds of the step prices are relative to: the AR step (else the fastest branch)."""
        return self.branches.get("ar1") or min(self.branches.values())

    def relative(self) -> dict[str, float]:
        unit = self.unit()
        return {k: v / unit for k, v in self.branches.items()}

    def merged(self, other: CostProfile) -> CostProfile:
        """Two measurements combined: the unit (the AR step) at the faster of the two,
        as load from elsewhere only adds time; every other branch, and the refill, at the mean
        of their two prices relative to it (each measured beside its own AR step)."""
        ua, ub = self.unit(), other.unit()
        base = min(ua, ub)
        mean = lambda a, b: base * (a / ua + (a / ua if b is None else b / ub)) / 2
        times = {k: mean(v, other.branches.get(k)) for k, v in self.branches.items()}
        draft_pass = mean(self.draft_pass, other.draft_pass)
        return dataclasses.replace(
            self, branches=times, draft_pass=draft_pass, rows=dict(self.rows)
        )

    def save(self, path: str) -> None:
        """Write as JSON, atomically (a crash leaves the old file or none)."""
        write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str) -> CostProfile:
        if not os.path.exists(path):
            raise FileNotFoundError(f"cost profile {path} does not exist")
        with open(path) as f:
            raw = json.load(f)
        missing = {"batch_size", "branches", "draft_pass"} - raw.keys()
        if missing:
            raise ValueError(f"{path} is not a cost profile: no {sorted(missing)}")
        return cls(
            int(raw["batch_size"]),
            {k: float(v) for k, v in raw["branches"].items()},
            float(raw["draft_pass"]),
            {k: tuple(v) for k, v in raw.get("rows", {}).items()},
            raw.get("source", "measured"),
        )


def estimate(
    cfg: ModelConfig,
    dcfg: DraftConfig,
    batch: int,
    branches,
    *,
    backend: str = "cpu",
    itemsize: int = 4,
    draft_vocab: int = 0,
) -> CostProfile:
    """A profile from parameter bytes and FLOPs (see the module docstring); seconds are in units
    of one read of the target's weights. draft_vocab: ids the draft pass's head covers (0: V)."""
    ridge = RIDGE.get(backend, RIDGE["gpu"])
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attn = h * cfg.num_heads * cfg.head_dim * 2 + h * kv * 2
    layer = attn + 3 * h * cfg.intermediate_size
    window = batch * 2 * CONTEXT * kv * itemsize  # K and V of every sequence's window

    def weights(params, rows):
        return params * itemsize + 2.0 * params * rows / ridge

    def attention(rows):  # a layer's cache reads, and QK^T and PV over the window for each row
        return window + 4.0 * CONTEXT * cfg.num_heads * cfg.head_dim * rows / ridge

    def forward(shallow, deep, mask, head_rows, head_vocab):
        """shallow/deep: clean rows per sequence; mask: mask rows per sequence."""
        s, d = dcfg.split(cfg), dcfg.depth
        t = s * (weights(layer, batch * shallow) + attention(batch * shallow)) if shallow else 0
        rows = batch * (deep + mask)
        t += d * (weights(layer, rows) + attention(rows))
        if mask:
            t += d * weights(attn, batch * mask)  # the draft's projectors
        if head_rows:
            t += weights(h * head_vocab, batch * head_rows)
        return t

    w, vd = dcfg.block_size, draft_vocab or cfg.vocab_size
    draft_pass = forward(0, 0, w, w - 1, vd)
    times = {}
    for kind, r in branches:
        if kind == "ar":
            t = forward(1, 1, 0, 1, cfg.vocab_size)
        elif kind == "seq":
            t = forward(r, r, 0, r, cfg.vocab_size) + draft_pass
        else:
            t = forward(r, r, r * w, r, cfg.vocab_size) + weights(h * vd, batch * (w - 1))
        times[branch_name((kind, r))] = float(t)
    unit = weights(cfg.num_layers * layer + h * cfg.vocab_size, 0)
    rows = {branch_name(b): branch_rows(b, w) for b in branches}
    scaled = {k: v / unit for k, v in times.items()}
    return CostProfile(batch, scaled, float(draft_pass / unit), rows, "estimate")


def profile_plan(branches) -> list[tuple[int, str]]:
    """One round of `Decoder.measure`: (branch index, "time" | "refill") in run order.

    A speculative step that follows an AR step has no drafts and first runs a draft pass (the
    refill). So the first speculative branch after AR runs twice: once timed as "refill" (draft
    pass included), then as "time" with its drafts in hand, like every other speculative branch.
    The refill's cost is the difference of the two."""
    plan, after_ar = [], False
    for i, (kind, _) in enumerate(branches):
        if kind == "ar":
            after_ar = True
        elif after_ar:
            plan.append((i, "refill"))
            after_ar = False
        plan.append((i, "time"))
    return plan
