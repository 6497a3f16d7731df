"""Train a FlexDraft drafter: `python launch/train.py --config=configs/NAME.py --workdir=DIR`.

Overrides: `--config.train.steps=100 --config.train.stage=calibration`. Multi-host: on TPU pods
pass --distributed (auto-detected coordinator); elsewhere give --coordinator_address,
--num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the exported draft.")
_STAGE = flags.DEFINE_enum(
    "stage", None, ["attention", "calibration", "joint"], "Overrides config.train.stage."
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() (TPU pods).")
_COORD = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0."
)
_NPROC = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None, "Number of processes."
)
_PID = flags.DEFINE_integer(
    "process_id",
    int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
    "This process's index.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    if _COORD.value:
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()
    from flexdraft_jax.training import trainer

    config = _CONFIG.value
    if _STAGE.value:
        config.train.stage = _STAGE.value
    logging.info("process %d/%d, config:\n%s", jax.process_index(), jax.process_count(), config)
    trainer.train(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
