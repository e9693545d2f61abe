"""Tests for `zoo.datasets`: offline sets, the split, and downloads that fail clearly."""

from __future__ import annotations

import socket
import urllib.error

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from zoo import datasets

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # 1,797 in all


@pytest.fixture
def no_network(monkeypatch):
    """Makes any attempt to open a connection or download fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(keras.utils, "get_file", refuse)


def test_digits_vectors_have_the_documented_shapes(no_network):
    data = datasets.load()

    assert data.name == "digits" and data.num_classes == 10 and data.input_shape == (64,)
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.y_train.shape == (1437,) and data.y_test.shape == (360,)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0


def test_digits_split_is_stratified_and_complete(no_network):
    data = datasets.load("digits")
    train_counts = np.bincount(data.y_train, minlength=10)
    test_counts = np.bincount(data.y_test, minlength=10)

    assert (train_counts + test_counts).tolist() == DIGITS_CLASS_COUNTS
    expected_test = 0.2 * np.array(DIGITS_CLASS_COUNTS)
    assert np.all(np.abs(test_counts - expected_test) <= 1)
    # The two splits together are scikit-learn's 1,797 images, each exactly once, over 16.
    rows = np.concatenate([data.x_train, data.x_test])
    original = load_digits().data.astype(np.float32) / 16
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(original, axis=0))
    assert len(rows) == len(original)


def test_digits_as_images_match_the_vectors(no_network):
    vectors = datasets.load("digits")
    images = datasets.load("digits", as_images=True)

    assert images.input_shape == (8, 8, 1)
    assert images.x_train.shape == (1437, 8, 8, 1) and images.x_test.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(images.x_train.reshape(1437, 64), vectors.x_train)
    np.testing.assert_array_equal(images.y_test, vectors.y_test)


def test_split_depends_on_seed_and_fraction_only(no_network):
    first, again = datasets.load(seed=3), datasets.load(seed=3)
    other = datasets.load(seed=4)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    assert not np.array_equal(first.y_train, other.y_train)
    half = datasets.load(test_fraction=0.5)
    assert len(half.y_test) == 899 and len(half.y_train) == 898


def test_synthetic_sets_are_seeded_and_balanced(no_network):
    spirals = datasets.load("spirals")
    assert spirals.input_shape == (2,) and spirals.num_classes == 2
    assert spirals.x_train.shape == (800, 2) and spirals.x_test.shape == (200, 2)
    assert np.bincount(spirals.y_test).tolist() == [100, 100]
    assert np.abs(spirals.x_train).max() < 1.2
    # The arms wind around each other: a line separates them hardly better than chance.
    linear = LogisticRegression().fit(spirals.x_train, spirals.y_train)
    assert linear.score(spirals.x_test, spirals.y_test) < 0.75
    np.testing.assert_array_equal(spirals.x_test, datasets.load("spirals").x_test)
    assert not np.array_equal(spirals.x_test, datasets.load("spirals", seed=1).x_test)

    blobs = datasets.load("blobs")
    assert blobs.num_classes == 3 and blobs.x_train.shape == (480, 2)
    assert np.bincount(blobs.y_train).tolist() == [160, 160, 160]
    centre = blobs.x_train[blobs.y_train == 0].mean(axis=0)
    np.testing.assert_allclose(centre, [1.0, 0.0], atol=0.1)
    linear = LogisticRegression().fit(blobs.x_train, blobs.y_train)
    assert linear.score(blobs.x_test, blobs.y_test) > 0.85


def test_list_datasets():
    assert datasets.list_datasets() == [
        "blobs",
        "cifar10",
        "digits",
        "fashion_mnist",
        "mnist",
        "spirals",
    ]
    assert datasets.list_datasets(include_downloads=False) == ["blobs", "digits", "spirals"]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_failed_download_raises_a_clear_error(name, monkeypatch):
    def offline():
        raise Exception(  # what keras.utils.get_file raises for a URLError
            "URL fetch failure on https://storage.googleapis.com/...: None -- "
            f"{urllib.error.URLError('no network').reason}"
        )

    monkeypatch.delenv(datasets.OFFLINE_ENV_VAR, raising=False)
    monkeypatch.setattr(getattr(keras.datasets, name), "load_data", offline)
    message = rf"{name}.*download failed.*load\('digits'\)"
    with pytest.raises(ConnectionError, match=message) as info:
        datasets.load(name)
    assert "no network" in str(info.value)
    assert isinstance(info.value.__cause__, Exception)


def test_offline_env_var_skips_the_download(monkeypatch):
    def must_not_run():
        raise AssertionError("load_data was called although ZOO_OFFLINE=1")

    monkeypatch.setenv(datasets.OFFLINE_ENV_VAR, "1")
    monkeypatch.setattr(keras.datasets.mnist, "load_data", must_not_run)
    with pytest.raises(ConnectionError, match=r"ZOO_OFFLINE=1 forbids downloads"):
        datasets.load("mnist")


def test_downloaded_set_is_normalized_and_keeps_the_official_split(monkeypatch):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    y_train = np.repeat(np.arange(10, dtype=np.uint8), 4).reshape(-1, 1)
    y_test = np.arange(10, dtype=np.uint8).reshape(-1, 1)
    monkeypatch.delenv(datasets.OFFLINE_ENV_VAR, raising=False)
    monkeypatch.setattr(
        keras.datasets.cifar10, "load_data", lambda: ((x_train, y_train), (x_test, y_test))
    )

    images = datasets.load("cifar10", as_images=True)
    assert images.input_shape == (32, 32, 3) and images.num_classes == 10
    np.testing.assert_allclose(images.x_test, x_test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(images.y_train, y_train.ravel())
    assert images.y_train.dtype == np.int32 and images.x_train.dtype == np.float32

    vectors = datasets.load("cifar10", test_fraction=0.2)
    assert vectors.input_shape == (3072,)
    assert vectors.x_train.shape == (40, 3072) and vectors.x_test.shape == (10, 3072)
    assert np.bincount(vectors.y_test).tolist() == [1] * 10


BAD_LOAD_ARGS = [
    (
        dict(name="imagenet"),
        r"Unknown data set: name='imagenet'\. Available offline: blobs, digits, "
        r"spirals; through a download: cifar10, fashion_mnist, mnist",
    ),
    (
        dict(name="spirals", as_images=True),
        r"`as_images=True` needs an image data set.*Image data sets: cifar10, digits, "
        r"fashion_mnist, mnist",
    ),
    (
        dict(test_fraction=1.0),
        r"`test_fraction` must be a float in \(0, 1\).*Received: test_fraction=1\.0",
    ),
    (dict(test_fraction=0), r"Received: test_fraction=0"),
    (dict(seed=-1), r"`seed` must be an integer >= 0\. Received: seed=-1"),
]


def test_load_rejects_bad_arguments(no_network):
    for kwargs, message in BAD_LOAD_ARGS:
        with pytest.raises(ValueError, match=message):
            datasets.load(**kwargs)
