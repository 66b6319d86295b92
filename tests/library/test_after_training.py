"""recalibrate_statistics, fold_batch_norm, export_for_serving."""

import sys

import keras
import numpy as np
import pytest

import kerasbn
import kerasbn.folding
import kerasbn.population
from tests.helpers import forkserver, reference

RNG = np.random.RandomState(0)


def _randomize(model, seed=0):
    rng = np.random.RandomState(seed)
    for w in model.weights:
        positive = "variance" in w.name or "gamma" in w.name or "stddev" in w.name
        value = rng.uniform(0.5, 1.5, w.shape) if positive else rng.normal(0, 0.5, w.shape)
        w.assign(value.astype("float32"))
    return model


def _inception_block():
    """Shared input, four branches (1x1, 1x1-3x3, 1x1-3x3-3x3 double, pool-1x1), concatenated."""
    inputs = keras.Input((8, 8, 3))
    stem = keras.layers.SeparableConv2D(8, 3, depth_multiplier=2, padding="same", use_bias=False)(inputs)
    stem = kerasbn.BatchNormalization()(stem)
    stem = keras.layers.ReLU()(stem)

    def conv_bn(x, filters, size, bn=kerasbn.BatchNormalization):
        x = keras.layers.Conv2D(filters, size, padding="same", use_bias=False)(x)
        return keras.layers.ReLU()(bn()(x))

    b1 = conv_bn(stem, 4, 1, keras.layers.BatchNormalization)
    b2 = conv_bn(conv_bn(stem, 3, 1), 4, 3)
    b3 = conv_bn(conv_bn(conv_bn(stem, 3, 1), 4, 3), 4, 3)
    b4 = keras.layers.AveragePooling2D(3, 1, "same")(stem)
    b4 = kerasbn.BatchNormalization()(b4)  # after pooling: cannot fold, must stay
    dw = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(stem)
    dw = kerasbn.BatchNormalization()(dw)
    h = keras.layers.Concatenate()([b1, b2, b3, b4, dw])
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(5)(h)
    return keras.Model(inputs, kerasbn.BatchNormalization()(h))


def _channels_first_and_nested():
    inner_in = keras.Input((4, 6))
    inner = keras.layers.Conv1D(5, 3, data_format="channels_first", padding="same")(inner_in)
    inner = kerasbn.BatchNormalization(axis=1)(inner)
    inner_model = keras.Model(inner_in, inner)
    inputs = keras.Input((4, 6))
    h = inner_model(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(3, use_bias=False)(h)
    h = keras.layers.BatchNormalization(center=False)(h)
    return keras.Model(inputs, h)


def _conv3d():
    return keras.Sequential([
        keras.Input((4, 4, 4, 2)), keras.layers.Conv3D(3, 2), kerasbn.BatchNormalization(),
        keras.layers.Conv3D(3, 2, activation="relu"), kerasbn.BatchNormalization(),  # activation: stays
    ])


@pytest.mark.parametrize("make,expected_folds", [
    (_inception_block, 9), (_channels_first_and_nested, 2), (_conv3d, 1)])
def test_folding_keeps_the_inference_function(make, expected_folds):
    model = _randomize(make())
    folded = kerasbn.fold_batch_norm(model)
    kinds = [type(layer).__name__ for layer in folded._flatten_layers(include_self=False)]
    assert kinds.count("FoldedBatchNorm") == expected_folds
    x = RNG.normal(0, 1, (4,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(folded(x)), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # The original is untouched and still has every BN.
    assert "FoldedBatchNorm" not in [type(layer).__name__ for layer in model._flatten_layers()]


def test_folding_a_model_without_bn_warns_and_returns_it():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="no batch-normalization"):
        assert kerasbn.fold_batch_norm(model) is model


def test_bn_affine_matches_the_paper():
    bn = _randomize(keras.Sequential([keras.Input((3,)), kerasbn.BatchNormalization()])).layers[0]
    a, b = kerasbn.folding.bn_affine(bn)
    x = RNG.normal(0, 1, (5, 3))
    expected = reference.bn_inference(x, -1, bn.gamma.numpy(), bn.beta.numpy(),
                                      bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon)
    # float32 parameters against float64: outputs near 0 need the absolute bound.
    np.testing.assert_allclose(a * x + b, expected, rtol=1e-6, atol=1e-6)


def _recalibration_model():
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    h = kerasbn.BatchNormalization(momentum=0.9)(h)
    h = keras.layers.ReLU()(h)
    inner_in = keras.Input((4, 4, 4))
    inner = keras.layers.Conv2D(5, 1)(inner_in)
    inner = keras.layers.BatchNormalization(momentum=0.99)(inner)
    h = keras.Model(inner_in, inner, name="inner")(h)
    h = keras.layers.Dropout(0.5)(h)
    return keras.Model(inputs, h)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_recalibration_is_algorithm_2(as_dataset):
    model = _randomize(_recalibration_model())
    batches = [RNG.normal(2, 3, (16, 6, 6, 3)).astype("float32") for _ in range(6)]
    labels = np.zeros((16, 1), "float32")
    if as_dataset:  # a tf.data pipeline: on JAX too (Keras' JAX users often read through tf.data)
        tf = pytest.importorskip("tensorflow")
    data = (tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).batch(16) if as_dataset
            else [(b, labels) for b in batches])
    weights_before = [w.numpy().copy() for w in model.trainable_weights]
    first, second = model.layers[2], model.get_layer("inner").layers[2]
    result = kerasbn.recalibrate_statistics(model, data, steps=5, verbose=0)
    assert result is model
    # Reference: each BN's input in training mode (BN 1 normalizes with batch stats), float64.
    conv1 = keras.Model(model.inputs, model.layers[1].output)
    means1, vars1, means2, vars2 = [], [], [], []
    for b in batches[:5]:
        z1 = np.asarray(conv1(b))
        f1 = reference.channels_last(z1, -1)
        means1.append(f1.mean(0))
        vars1.append(f1.var(0, ddof=1))
        y1 = reference.bn_forward(z1, -1, first.gamma.numpy(), first.beta.numpy(), first.epsilon)[0]
        inner_conv = model.get_layer("inner").layers[1]
        z2 = np.asarray(inner_conv(np.maximum(y1, 0).astype("float32")))
        f2 = reference.channels_last(z2, -1)
        means2.append(f2.mean(0))
        vars2.append(f2.var(0, ddof=1))
    np.testing.assert_allclose(first.moving_mean, np.mean(means1, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.moving_variance, np.mean(vars1, 0), rtol=1e-4)
    np.testing.assert_allclose(second.moving_mean, np.mean(means2, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(second.moving_variance, np.mean(vars2, 0), rtol=1e-4)
    # Weights frozen, settings restored, the layers still train as before.
    for before, w in zip(weights_before, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(before, w.numpy())
    assert first.momentum == 0.9 and second.momentum == 0.99
    assert "call" not in vars(first) and "call" not in vars(second)


def test_recalibration_errors_and_warnings():
    model = _recalibration_model()
    with pytest.raises(ValueError, match="no batches"):
        kerasbn.recalibrate_statistics(model, [], verbose=0)
    with pytest.raises(ValueError, match="steps"):
        kerasbn.recalibrate_statistics(model, [np.zeros((2, 6, 6, 3))], steps=0)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="no batch-normalization"):
        kerasbn.recalibrate_statistics(plain, [np.zeros((2, 3))])


def test_export_reloads_in_a_fresh_process_and_lists_the_signature(tmp_path):
    model = _randomize(_inception_block())
    x = RNG.normal(0, 1, (3, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    expected = np.asarray(model(x, training=False))
    # The BN after average pooling has nothing to fold into: exported as it is, and named.
    with pytest.warns(UserWarning, match=r"1 of 10 BN layers not folded.*AveragePooling2D"):
        served = kerasbn.export_for_serving(model, tmp_path / "export")
    assert "FoldedBatchNorm" in [type(layer).__name__ for layer in served.layers]
    # One fresh process serves it, then runs `saved_model_cli show --all` (the CLI's own main, as
    # `python -m tensorflow.python.tools.saved_model_cli` runs it).
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(tmp_path / 'export')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, m.serve(np.load({str(tmp_path / 'x.npy')!r})).numpy())\n"
        "from tensorflow.python.tools import saved_model_cli\n"
        f"sys.argv = ['saved_model_cli', 'show', '--dir', {str(tmp_path / 'export')!r}, '--all']\n"
        "saved_model_cli.main()\n"
    )
    cli = forkserver.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)
    assert "serving_default" in cli.stdout and "serve" in cli.stdout


class ConvBlock(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, use_bias=False)
        self.bn = kerasbn.BatchNormalization()

    def call(self, x, training=None):
        return keras.activations.relu(self.bn(self.conv(x), training=training))


class SubclassedNet(keras.Model):
    """BN inside a custom layer inside a subclassed model: no graph to rebuild."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = ConvBlock()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, x, training=None):
        return self.head(self.pool(self.block(x, training=training)))


def test_a_subclassed_model_is_exported_unfolded_with_a_warning_and_serves(tmp_path):
    import tensorflow as tf

    model = SubclassedNet()
    x = RNG.normal(0, 1, (2, 8, 8, 3)).astype("float32")
    model(x)
    _randomize(model)
    kerasbn.recalibrate_statistics(model, [x], steps=1, verbose=0)
    expected = np.asarray(model(x, training=False))
    with pytest.warns(UserWarning, match=r"1 of 1 BN layers not folded.*subclassed model SubclassedNet"):
        served = kerasbn.export_for_serving(model, tmp_path / "export")
    assert served is model
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fold_batch_norm needs a functional or Sequential model"):
        kerasbn.fold_batch_norm(model)  # it cannot rebuild the model, and says so


def test_export_to_an_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), kerasbn.BatchNormalization()])
    with pytest.raises(OSError, match="not a directory|cannot write"):
        kerasbn.export_for_serving(model, blocker)
    with pytest.raises(OSError, match="cannot write"):
        kerasbn.export_for_serving(model, blocker / "sub" / "export")


def test_folded_model_through_onnx():
    import tensorflow as tf

    tf2onnx = pytest.importorskip("tf2onnx", reason="the `serve` extra (tf2onnx) is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the `serve` extra (onnxruntime) is not installed")
    model = _randomize(_inception_block())
    folded = kerasbn.fold_batch_norm(model)
    x = RNG.normal(0, 1, (2, 8, 8, 3)).astype("float32")
    spec = [tf.TensorSpec((None, 8, 8, 3), tf.float32, name="x")]
    function = tf.function(lambda x: folded(x, training=False))
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=17)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
