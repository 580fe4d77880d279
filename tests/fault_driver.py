"""A training run in its own process, for the fault tests (tests/test_faults.py).

python tests/fault_driver.py CKPT_DIR OUT.npz EPOCHS [--resume]
Exit codes: 0 finished (params written to OUT.npz), 130/143 stopped by SIGINT/SIGTERM.
"""
import signal
import sys

import jax
import numpy as np
import optax

import bpjax as bp
from bpjax import datasets, models, train


def main():
    ckpt, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    data = datasets.xor(copies=256)
    result = train.fit(models.textbook_mlp(2), bp.softmax_cross_entropy(), data,
                       optimizer=optax.adam(1e-2), epochs=epochs, batch_size=16, patience=None,
                       checkpoint_dir=ckpt, resume="--resume" in sys.argv, progress=False,
                       log=lambda s: print(s, flush=True))
    if result.interrupted_by:
        sys.exit(128 + int(getattr(signal, result.interrupted_by)))
    np.savez(out, *[np.asarray(a) for a in jax.tree_util.tree_leaves(result.params)])


if __name__ == "__main__":
    main()
