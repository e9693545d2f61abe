"""kgrad and zoo on JAX or torch do not import TensorFlow.

Only `kgrad/backend/tensorflow.py` imports it for the step hook (and the TensorBoard
sink, on first use, as Keras's own `TensorBoard` callback does). Checked in a fresh
process, since the test session may have imported TensorFlow for other reasons.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.backends(
    "jax", "torch", reason="on TensorFlow, TensorFlow is imported by design"
)

_SCRIPT = textwrap.dedent(
    """
    import sys
    import keras, numpy as np
    import kgrad, zoo
    from kgrad import cli, plots  # noqa: F401

    for name in kgrad.__all__ + zoo.__all__:
        getattr(kgrad if name in kgrad.__all__ else zoo, name)
    model = zoo.build_mlp((8,), 3, depth=2, width=8)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    logger = kgrad.GradientNormLogger(csv_path=sys.argv[1])
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.arange(32) % 3
    model.fit(x, y, epochs=1, batch_size=8, verbose=0,
              callbacks=[logger, kgrad.EarlyStopping(monitor="loss")])
    logger.records.to_dataframe()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
    print("TENSORFLOW:", loaded[:5])
    """
)


def test_kgrad_and_zoo_work_without_importing_tensorflow(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "norms.csv")],
        env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "TENSORFLOW: []"
    assert (tmp_path / "norms.csv").stat().st_size > 0
