"""A keras-tuner search over `zoo.HyperCNN` on digits as images, with gradient health
per trial, on every backend kgrad supports."""

from __future__ import annotations

import keras_tuner
import pytest

import zoo

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

SEED = 7  # keras-tuner silently replaces seed=0 by a random seed


def test_cnn_search_completes_with_gradient_health_per_trial(tmp_path):
    data = zoo.datasets.load("digits", as_images=True)
    x, y = data.x_train[:192], data.y_train[:192]
    hypermodel = zoo.HyperCNN((8, 8, 1), 10, stages=2, filters=4, blocks_per_stage=1,
                              block=["plain", "residual"], activation="relu",
                              kernel_initializer="auto", dropout=0.0, optimizer="adam",
                              clip_threshold=None, learning_rate=1e-2, batch_size=64)
    tuner = keras_tuner.GridSearch(hypermodel, "val_accuracy", directory=tmp_path,
                                   seed=SEED)

    tuner.search(x, y, validation_data=(data.x_test[:64], data.y_test[:64]), epochs=1,
                 verbose=0)
    frame = zoo.tuner_results(tuner)

    assert sorted(frame.block) == ["plain", "residual"]
    assert (frame.status == "COMPLETED").all() and frame.score.between(0, 1).all()
    # The per-trial logger saw the real steps: a finite profile across the conv layers.
    assert frame.diverged.eq(0.0).all()
    assert frame.grad_first_to_last.notna().all()
    assert frame.grad_decay_per_layer.gt(0).all()
