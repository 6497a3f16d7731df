"""The FlexDraft training loop: attention tuning and bonus-guided calibration (DESIGN §2.5).

`train(config, workdir)` reads top to bottom: mesh -> target -> data -> shapes -> shardings ->
sharded init -> step -> restore -> loop. Stages (`config.train.stage`):

  attention    mask embedding + draft projectors; calibration MLP excluded from the loss
  calibration  only the calibration MLP (everything upstream is a constant of the step)
  joint        everything in the draft tree

One step: a causal clean forward of the frozen target writes the clean K/V of every layer into a
cache of capacity T (and gives the clean hidden states for KL targets and target bonuses); then only
the A*W mask rows run through the deep layers against that cache (`layouts.training(0, anchors)`:
no clean rows, q_limit = anchor). The clean pass does not depend on the draft, so its backward is
never computed, and gradients reach exactly the trainable subset of the draft (the target is an
argument that is never written; tests check it is bit-identical after training).

Cost (SmolLM2-135M, 2 CPU cores): the clean pass is ~90% of a step, so batches are cropped to
their longest sequence (length buckets, one executable per width) and anchors are dense; with
`train.cache_clean` the deep-layer clean K/V is computed once for all epochs (`clean_cache`). The
step itself (loss, gradients of the trainable subset, update) is `training.step`.

Writes to `workdir`: checkpoints/ (orbax: step, draft, optimizer state; the data order and anchors
are functions of (seed, step), so resuming is exact), metrics.jsonl, and draft_release/ (the final
draft in the public release's safetensors layout, readable by `checkpoints.release.load_release`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from flexdraft_jax import sharding as shd
from flexdraft_jax.common import write_json_atomic
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.training import data as data_lib
from flexdraft_jax.training.step import kl_topk, make_optimizer, make_train_step, trainable_keys

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "lengths", "loss_mask", "anchors", "anchor_valid")


# ----------------------------------------------------------------------------- target


def load_target(mc: ml_collections.ConfigDict, seed: int):
    """(ModelConfig, numpy-or-None params, tokenizer, model id). "tiny" builds params later,
    already sharded, from `seed`."""
    if mc.source == "tiny":
        cfg = ModelConfig(**dict(mc.tiny))
        digest = hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]
        return cfg, None, None, f"tiny-{seed}-{dtype_name(mc.dtype)}-{digest}"
    from flexdraft_jax.checkpoints.load import load_checkpoint

    path = None if mc.source == "default" else mc.source
    cfg, params, tokenizer = load_checkpoint(path, dtype=jnp.dtype(mc.dtype))  # bf16: half the RAM
    return cfg, params, tokenizer, None


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def place_target(cfg, params, mesh, dtype, seed: int):
    """The target as global arrays sharded by the rules (random init for the tiny model)."""
    dtype = jnp.dtype(dtype)
    if params is None:
        init = lambda k: jax.tree.map(lambda x: x.astype(dtype), tf.init_target(cfg, k))
        abstract = jax.eval_shape(init, jax.random.PRNGKey(seed))
        sh = shd.shardings(shd.param_specs(abstract, mesh), mesh)
        return jax.jit(init, out_shardings=sh)(jax.random.PRNGKey(seed))
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    sh = shd.shardings(shd.param_specs(params, mesh), mesh)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]), params, sh
    )


# ----------------------------------------------------------------------------- data


def build_dataset(config, cfg, target, tokenizer, model_id, mesh=None) -> data_lib.Dataset:
    """Prompts, their self-distilled responses (one SPMD generation on `mesh` with the sharded
    `target`, the same on every process), packed into a Dataset."""
    dc, tc = config.data, config.train
    to_distill, given = data_lib.build_examples(
        list(dc.sources),
        tokenizer=tokenizer,
        num_prompts=dc.num_prompts,
        seed=config.seed,
        chat_template=dc.chat_template,
        max_prompt_tokens=dc.max_prompt_tokens,
        vocab_size=cfg.vocab_size,
        weights=tuple(dc.get("weights", ())),
    )
    examples = list(given)
    if to_distill:
        responses = data_lib.distill(
            cfg,
            target,
            to_distill,
            dc.max_new_tokens,
            batch_size=dc.gen_batch_size,
            cache_dir=dc.cache_dir or os.path.expanduser("~/.cache/flexdraft_jax/distill"),
            model_id=model_id,
            mesh=mesh,
        )
        examples += list(zip(to_distill, responses))
    packed = data_lib.pack(examples, dc.seq_len)
    n_resp = int(packed.loss_mask.sum())
    log.info("training data: %d sequences, %d response tokens", len(packed.lengths), n_resp)
    return data_lib.Dataset(
        packed,
        tc.batch_size,
        dc.anchors_per_seq,
        config.seed,
        length_bucket=dc.length_bucket,
        sort_window=dc.sort_window,
    )


def _to_host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def global_batch(local: dict, mesh, global_batch_size: int, keys=BATCH_KEYS) -> dict:
    """Process-local rows -> global arrays sharded over ("data", "fsdp")."""
    out = {}
    for k in keys:
        x = local[k]
        sh = NamedSharding(mesh, shd.batch_spec(x.ndim))
        out[k] = jax.make_array_from_process_local_data(sh, x, (global_batch_size, *x.shape[1:]))
    return out


def draft_init(cfg: ModelConfig, dcfg: DraftConfig, target, key) -> dict:
    """`init_draft` in float32 whatever the target's dtype (trained weights keep full precision)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32), tf.init_draft(cfg, dcfg, target, key))


def abstract_state(config, mesh) -> tuple[dict, dict]:
    """(target, train state) as ShapeDtypeStructs for `config.model.tiny`'s architecture, with
    their partition specs on `mesh` (which may be an AbstractMesh). Nothing is allocated."""
    cfg = ModelConfig(**dict(config.model.tiny))
    dcfg = DraftConfig(config.draft.depth, config.draft.block_size, config.draft.calib_rank)
    dtype = jnp.dtype(config.model.dtype)
    init = lambda k: jax.tree.map(lambda x: x.astype(dtype), tf.init_target(cfg, k))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    target = jax.eval_shape(init, key)
    draft = jax.eval_shape(functools.partial(draft_init, cfg, dcfg), target, key)
    optimizer, _ = make_optimizer(config.train)
    keys = trainable_keys(config.train.stage)
    opt_state = jax.eval_shape(optimizer.init, {k: draft[k] for k in keys})
    return target, {"draft": draft, "opt_state": opt_state}


def check_config_sharding(config, min_bytes: int = 4 * 2**20) -> list[str]:
    """Parameters (target, draft, Adam moments) above `min_bytes` that `config.mesh` on
    `config.mesh.expected_devices` devices would leave replicated. Abstract: nothing allocated."""
    sizes = shd.resolve_mesh_shape(tuple(config.mesh.shape), config.mesh.expected_devices)
    mesh = shd.abstract_mesh(sizes)
    target, state = abstract_state(config, mesh)
    bad = shd.check_sharded(target, mesh, min_bytes)
    bad += shd.check_sharded(state["draft"], mesh, min_bytes)
    moments = [
        s.mu
        for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ]
    for mu in moments:
        bad += [f"adam moment {b}" for b in shd.check_sharded(mu, mesh, min_bytes)]
    return bad


def grow_calibration(old: dict, fresh: dict) -> dict:
    """A wider calibration MLP that computes what `old` does: `old`'s hidden units first, then
    `fresh`'s remaining ones, whose fc2 rows are zero (a fresh MLP's fc2 is zero-initialised)."""
    r = old["fc1"]["kernel"].shape[1]
    fc1 = {k: np.concatenate([old["fc1"][k], np.asarray(fresh["fc1"][k])[..., r:]], axis=-1)
           for k in ("kernel", "bias")}  # fmt: skip
    added = np.zeros_like(np.asarray(fresh["fc2"]["kernel"])[r:])
    fc2 = {"kernel": np.concatenate([old["fc2"]["kernel"], added]), "bias": old["fc2"]["bias"]}
    return {"fc1": fc1, "fc2": fc2}


def load_init_draft(
    path: str, cfg: ModelConfig, dcfg: DraftConfig, fresh_calibration=None, fresh_layers=None
) -> dict:
    """A draft to start from: a release-format directory, or a previous stage's workdir.

    fresh_calibration: when given (a stage that trains the calibration MLP), a draft whose
    calibration rank differs from `dcfg.calib_rank` is accepted: a lower rank is widened by
    `grow_calibration` (the same function to start with), a higher one gets `fresh_calibration()`
    instead of its own MLP. fresh_layers: when given, a shallower draft is accepted and grown
    to `dcfg.depth`: its layers stay the deepest, and the layers added above them come from
    `fresh_layers()` (an initial draft's `layers`, all `dcfg.depth` of them). The block size
    must always match."""
    from flexdraft_jax.checkpoints import release

    if os.path.isdir(os.path.join(path, "draft_release")):
        path = os.path.join(path, "draft_release")
    got, draft = release.load_release(path, cfg)
    rank_ok = got.calib_rank == dcfg.calib_rank or fresh_calibration is not None
    depth_ok = got.depth == dcfg.depth or (fresh_layers is not None and got.depth < dcfg.depth)
    if got.block_size != dcfg.block_size or not rank_ok or not depth_ok:
        raise ValueError(
            f"draft at {path} has depth={got.depth}, block_size={got.block_size}, "
            f"calib_rank={got.calib_rank}; the config asks for depth={dcfg.depth}, "
            f"block_size={dcfg.block_size}, calib_rank={dcfg.calib_rank}"
        )
    if got.calib_rank > dcfg.calib_rank:
        log.info(
            "calibration rank %d -> %d: the calibration MLP starts afresh",
            got.calib_rank,
            dcfg.calib_rank,
        )
        draft = dict(draft, calibration=fresh_calibration())
    elif got.calib_rank < dcfg.calib_rank:
        log.info(
            "calibration rank %d -> %d: trained units kept, new ones added with zero output",
            got.calib_rank,
            dcfg.calib_rank,
        )
        draft = dict(draft, calibration=grow_calibration(draft["calibration"], fresh_calibration()))
    if got.depth < dcfg.depth:
        added = dcfg.depth - got.depth
        log.info("depth %d -> %d: layers added above the draft's own", got.depth, dcfg.depth)
        layers = jax.tree.map(
            lambda new, old: np.concatenate([np.asarray(new)[:added], old]),
            fresh_layers(),
            draft["layers"],
        )
        draft = dict(draft, layers=layers)
    return draft


# ----------------------------------------------------------------------------- train


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None, target=None) -> dict:
    """Run (or resume) training; returns {"state", "target", "cfg", "dcfg", "history", "data"}
    ("data": the training set's sequences and response tokens).

    devices: the devices of the mesh (default: all). target: optional (cfg, params, tokenizer) to
    use instead of `config.model` (tests).
    """
    t_call = time.perf_counter()
    tc = config.train
    dcfg = DraftConfig(
        depth=config.draft.depth,
        block_size=config.draft.block_size,
        calib_rank=config.draft.calib_rank,
        use_calibration=True,
    )
    pi, pc = jax.process_index(), jax.process_count()
    is_main = pi == 0
    max_minutes = tc.get("max_minutes", 0.0)
    if max_minutes and pc > 1:  # processes would stop at different steps
        raise ValueError(f"train.max_minutes={max_minutes} is for single-process runs ({pc} here)")
    os.makedirs(workdir, exist_ok=True)

    # ---------------------------------------------------------------- mesh
    mesh = shd.make_mesh(tuple(config.mesh.shape), devices)
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % n_batch_shards or tc.batch_size % pc:
        raise ValueError(
            f"train.batch_size={tc.batch_size} must be divisible by data*fsdp={n_batch_shards} "
            f"and by the {pc} processes"
        )
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, pc)

    # ---------------------------------------------------------------- target
    if target is not None:
        cfg, params, tokenizer = target
        model_id = None
    else:
        cfg, params, tokenizer, model_id = load_target(config.model, config.seed)
    cfg = cfg.replace(attention_impl=config.model.attention_impl)
    dcfg.split(cfg)  # validates depth
    target = place_target(cfg, params, mesh, config.model.dtype, config.seed)
    missing = shd.check_sharded(target, mesh) if mesh.size > 1 else []
    if missing:
        log.warning("large target params left replicated: %s", missing)

    # ---------------------------------------------------------------- data
    dataset = build_dataset(config, cfg, target, tokenizer, model_id, mesh)
    batch_keys = BATCH_KEYS
    if tc.get("cache_clean"):
        if pc > 1:
            raise ValueError("train.cache_clean is single-process for now")
        from flexdraft_jax.training import clean_cache

        p = dataset.packed
        ident = model_id or data_lib.params_fingerprint(cfg, jax.tree.map(_to_host, target))
        dataset.clean_kv = clean_cache.precompute(
            cfg,
            dcfg.depth,
            target,
            p.tokens,
            p.lengths,
            batch_size=tc.batch_size,
            dtype=tc.cache_clean_dtype,
            cache_dir=os.path.join(workdir, "clean_cache"),
            ident=ident,
            topk=kl_topk(tc),
            topk_from=np.maximum(p.loss_mask.argmax(axis=1) - 1, 0),  # the loss reads no earlier
        )
        batch_keys = BATCH_KEYS + data_lib.CLEAN_KEYS[: len(dataset.clean_kv)]
    log.info("%d steps per epoch of %d sequences", dataset.steps_per_epoch, tc.batch_size)
    vocab_order = data_lib.vocab_by_frequency(dataset.packed, cfg.vocab_size)
    n_vocab = tc.get("draft_vocab_size", 0)
    draft_vocab = vocab_order[:n_vocab] if n_vocab > 0 else None

    # ---------------------------------------------------------------- shapes
    optimizer, schedule = make_optimizer(tc)
    keys = trainable_keys(tc.stage)
    init_draft = functools.partial(draft_init, cfg, dcfg)
    key = jax.random.PRNGKey(config.seed)
    abstract_draft = jax.eval_shape(init_draft, target, key)
    abstract_opt = jax.eval_shape(optimizer.init, {k: abstract_draft[k] for k in keys})

    # ---------------------------------------------------------------- shardings
    draft_specs = shd.param_specs(abstract_draft, mesh)
    opt_specs = shd.opt_state_specs(optimizer, abstract_opt, {k: draft_specs[k] for k in keys})
    state_specs = {"step": P(), "draft": draft_specs, "opt_state": opt_specs}
    state_sh = shd.shardings(state_specs, mesh)
    target_sh = jax.tree.map(lambda x: x.sharding, target)
    batch_sh = {k: NamedSharding(mesh, shd.batch_spec(2)) for k in BATCH_KEYS}
    batch_sh["lengths"] = NamedSharding(mesh, shd.batch_spec(1))
    for k, arr in zip(batch_keys[len(BATCH_KEYS) :], dataset.clean_kv or ()):
        batch_sh[k] = NamedSharding(mesh, shd.batch_spec(arr.ndim))

    # ---------------------------------------------------------------- sharded init
    def init_state(target, key, draft=None):
        draft = init_draft(target, key) if draft is None else draft
        opt_state = optimizer.init({k: draft[k] for k in keys})
        return {"step": jnp.zeros((), jnp.int32), "draft": draft, "opt_state": opt_state}

    if tc.init_from:
        fresh = lambda part: lambda: jax.device_get(jax.jit(init_draft)(target, key)[part])
        # A new calibration rank may start afresh; new layers above a shallower draft may be added.
        calib = fresh("calibration") if "calibration" in keys else None
        layers = fresh("layers") if "layers" in keys else None
        start = load_init_draft(tc.init_from, cfg, dcfg, calib, layers)
        start = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]),
            start,
            state_sh["draft"],
        )
        state = jax.jit(init_state, out_shardings=state_sh)(target, key, start)
        log.info("draft initialised from %s", tc.init_from)
    else:
        state = jax.jit(init_state, out_shardings=state_sh)(target, key)

    # ---------------------------------------------------------------- step
    step_fn = jax.jit(
        make_train_step(cfg, dcfg, tc, optimizer, schedule, draft_vocab),
        in_shardings=(state_sh, target_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )

    # ---------------------------------------------------------------- restore
    mngr = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=tc.ckpt_every, max_to_keep=tc.keep_checkpoints
        ),
    )
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh
        )
        state = mngr.restore(
            latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        log.info("resumed from step %d", latest)
    start_step = int(jax.device_get(state["step"]))

    # ---------------------------------------------------------------- held-out tau
    ec = config.get("eval", None)
    heldout = None  # {set name: sequences}
    if ec is not None and ec.every > 0:  # every process: one sharded evaluation, logged by 0
        from flexdraft_jax.training import evaluate

        sets = tuple(ec.get("sets", ("humaneval",)))
        heldout = {name: evaluate.heldout_set(
            cfg,
            dcfg,
            target,
            tokenizer,
            prompt_set=name,
            num_prompts=ec.num_prompts,
            max_new_tokens=ec.max_new_tokens,
            seq_len=ec.seq_len,
            workdir=workdir,
            cache_dir=config.data.cache_dir or os.path.expanduser("~/.cache/flexdraft_jax/distill"),
            model_id=model_id,
            mesh=mesh,
            seed=config.seed,
        ) for name in sets}  # fmt: skip

    def eval_record(done, minutes):
        calib = "calibration" in keys
        draft = state["draft"]
        if draft_vocab is not None:  # as decoding will use it
            draft = tf.restrict_draft_vocab(cfg, target, draft, draft_vocab)
        rec = {"step": done, "train_minutes": minutes}
        for name, seqs in heldout.items():
            res = evaluate.teacher_forced_tau(cfg, dcfg, target, draft, seqs, use_calibration=calib)
            log.info(
                "step %d: held-out %s tau %.3f (%d anchors), decoded %.3f",
                done, name, res["tau"], res["anchors"], res["decoded_tau"],
            )  # fmt: skip
            pre = evaluate.EVAL_SETS[name]
            rec[pre + "tau"] = res["tau"]
            rec[pre + "decoded_tau"] = res["decoded_tau"]
            rec[pre + "acceptance"] = res["per_position_acceptance"]
            if calib:  # the same draft without its calibration MLP: the ablation
                rec[pre + "tau_nocalib"] = evaluate.teacher_forced_tau(
                    cfg, dcfg, target, draft, seqs, use_calibration=False
                )["tau"]
        return rec

    # ---------------------------------------------------------------- loop
    stop = tc.steps if not tc.get("stop_at") else min(tc.stop_at, tc.steps)
    history = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    progress_path = os.path.join(workdir, "progress.json")
    minutes = 0.0  # training wall time so far, across resumed runs (compile and eval excluded)
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            minutes = json.load(f).get("train_minutes", 0.0)
    bar = tqdm(total=stop, initial=start_step, desc=f"train {tc.stage}", disable=not is_main)
    pending, t_last, n_tokens = [], time.perf_counter(), 0
    compiled = {}  # one executable per batch width (length buckets)
    done = start_step
    stopper = _GracefulStop(enabled=pc == 1)  # SIGTERM: checkpoint and export, then stop
    try:
        for step in range(start_step, stop):
            batch = global_batch(dataset.batch(step, pi, pc), mesh, tc.batch_size, batch_keys)
            width = batch["tokens"].shape[1]
            if width not in compiled:
                t0 = time.perf_counter()
                compiled[width] = step_fn.lower(state, target, batch).compile()
                mem = compiled[width].memory_analysis()
                log.info(
                    "compiled the step for width %d in %.1fs; memory %s",
                    width,
                    time.perf_counter() - t0,
                    mem,
                )
                t_last += time.perf_counter() - t0  # compile time is not step time
            state, metrics = compiled[width](state, target, batch)
            pending.append(metrics)
            n_tokens += tc.batch_size * width
            done = step + 1
            out_of_time = max_minutes and time.perf_counter() - t_call >= 60 * max_minutes
            last = done == stop or stopper.requested or bool(out_of_time)
            if done % tc.log_every == 0 or last:
                host = jax.device_get(pending)
                now = time.perf_counter()
                rec = _summarise(host, done, now - t_last, n_tokens)
                minutes += (now - t_last) / 60
                rec["train_minutes"] = minutes
                t_last, n_tokens, pending = now, 0, []
                history.append(rec)
                if is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    write_json_atomic(progress_path, {"step": done, "train_minutes": minutes})
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc1=f"{rec['acc_per_slot'][1]:.3f}")
            if heldout is not None and (done % ec.every == 0 or last):
                jax.block_until_ready(state)
                t_eval = time.perf_counter()
                rec = eval_record(done, minutes)
                history.append(rec)
                if is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    png = os.path.join(workdir, "tau_vs_minutes.png")
                    evaluate.tau_curve_plot(metrics_path, png)
                t_last += time.perf_counter() - t_eval  # evaluation is not training time
            mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=last)
            bar.update(1)
            if last:
                break
    finally:
        stopper.restore()
    if stopper.requested:
        log.info("stopped by SIGTERM after step %d (checkpointed; rerun to resume)", done)
    elif done < stop:
        log.info("stopped after step %d: train.max_minutes=%s (checkpointed)", done, max_minutes)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()

    if tc.export_release and done > start_step:  # the draft as of the last step
        release_dir = os.path.join(workdir, "draft_release")
        final = [r for r in history if r.get("step") == done and "heldout_acceptance" in r]
        acceptance = evaluate.prior_acceptance(final[-1]) if final else None
        host = jax.tree.map(_to_host, state["draft"])  # once, for both uses below
        confidence = None
        # the prior's calibration, as launch/export_draft.py records it; a Decoder runs on one
        # process, so a multi-process run leaves it to that script
        if acceptance is not None and jax.process_count() == 1:
            from flexdraft_jax.models.draft import Draft

            shipped = Draft(host, dcfg, vocab_order, n_vocab)
            confidence = np.mean(
                [evaluate.prefill_confidence(cfg, target, shipped, s["prompts"])
                 for s in heldout.values()], axis=0,
            ).tolist()  # fmt: skip
        export_release(
            release_dir, cfg, dcfg, host, vocab_order, acceptance, n_vocab, target, confidence
        )
    data = {
        "sequences": int(len(dataset.packed.lengths)),
        "response_tokens": int(dataset.packed.loss_mask.sum()),
    }
    return {
        "state": state, "target": target, "cfg": cfg, "dcfg": dcfg, "history": history,
        "data": data,
    }  # fmt: skip


class _GracefulStop:
    """While installed, SIGTERM (a preemption, `kill`, a job scheduler's time limit) only sets
    `requested`: the loop then checkpoints the step it finished, exports the draft and returns.
    Single-process runs only (processes would stop at different steps otherwise)."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._previous = None
        if enabled:
            import signal
            import threading

            if threading.current_thread() is threading.main_thread():
                self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _summarise(host: list[dict], step: int, seconds: float, tokens: int) -> dict:
    mean = lambda k: np.mean([np.asarray(m[k]) for m in host], axis=0)
    rec = {"step": step}
    for k in host[0]:
        v = mean(k)
        rec[k] = v.tolist() if np.ndim(v) else float(v)
    rec["step_seconds"] = seconds / len(host)
    rec["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
    return rec


def export_release(
    path: str,
    cfg,
    dcfg,
    draft,
    vocab=None,
    acceptance=None,
    vocab_size=None,
    target=None,
    prefill_confidence=None,
) -> None:
    """The draft in the release layout, with the fingerprint of `target` when given."""
    from flexdraft_jax.checkpoints import release
    from flexdraft_jax.models.draft import target_fingerprint

    host = jax.tree.map(_to_host, draft)
    fingerprint = None
    if target is not None:
        embed = {"embed": {"embedding": _to_host(target["embed"]["embedding"])}}
        fingerprint = target_fingerprint(cfg, embed)
    if jax.process_index() == 0:
        release.save_release(
            path, cfg, dcfg, host, vocab=vocab, acceptance=acceptance, vocab_size=vocab_size,
            target_fingerprint=fingerprint, prefill_confidence=prefill_confidence,
        )  # fmt: skip
        log.info("draft exported to %s", path)
