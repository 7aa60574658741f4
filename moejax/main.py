"""moejax's entry point: flags -> config -> `train.train_and_evaluate`.

    python -m moejax.main --config=experiments/switch_small.py --workdir=runs/switch_small
    python -m moejax.main --config=experiments/switch_small.py:tiny --workdir=/tmp/tiny \
        --config.train.num_steps=20 --config.mesh.expert=8

`--config=FILE[:ARG]` loads `get_config(ARG)` from FILE; `--config.a.b=value` overrides one field.
Rerunning on the same workdir resumes from its newest checkpoint; SIGTERM saves and exits 0.
With several processes (`launch/local.sh`, SLURM, a TPU pod) every process runs this same
command; `moejax.distributed.initialize` joins them into one JAX runtime first.
"""

import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from moejax import checkpoint, distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and TFDS log every step of saving and building at INFO; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  joined = distributed.initialize()  # several processes (launch/, SLURM, TPU pods); else nothing
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except checkpoint.CheckpointError as error:  # where and why, in one line; no traceback
    print(f"moejax: {error}", file=sys.stderr, flush=True)
    # At once: the writes Orbax abandoned would otherwise print tracebacks at interpreter exit.
    os._exit(1)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    if not joined:
      raise
    # A peer's death often surfaces here; jax.distributed's shutdown would wait for it until its
    # heartbeat times out and then abort, so report and leave at once.
    traceback.print_exc()
    print(f"moejax: process {jax.process_index()} failed; exiting now.", file=sys.stderr,
          flush=True)
    os._exit(1)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
