"""BN-Inception's architecture (paper appendix, TF-slim's inception_v2 widths) and the variants' math."""

import keras
import numpy as np
import pytest

import kerasbn
from recipes.inception_bn import variants as V
from recipes.inception_bn.model import MODULES, LocalResponseNormalization, bn_inception, inception
from recipes.inception_bn.steps import l2_penalty


@pytest.fixture(scope="module")
def full_model():
    return bn_inception()


def _conv_params(k, cin, cout, bias=False):
    return k * k * cin * cout + (cout if bias else 0)


def test_parameter_count_follows_the_table(full_model):
    # Independent count from the table: convolutions without bias, BN gamma+beta (trainable)
    # and moving mean/variance (not), separable stem, 1000-way classifier.
    trainable, moving = 0, 0

    def conv(k, cin, cout):
        nonlocal trainable, moving
        trainable += _conv_params(k, cin, cout) + 2 * cout
        moving += 2 * cout
        return cout

    trainable += 7 * 7 * 3 * 8 + 3 * 8 * 64 + 2 * 64  # separable: depthwise x8, pointwise, BN
    moving += 2 * 64
    c = conv(1, 64, 64)
    c = conv(3, c, 192)
    for _, f1, f3r, f3, d3r, d3, _, proj, _ in MODULES:
        out = 0
        if f1:
            out += conv(1, c, f1)
        conv(1, c, f3r)
        out += conv(3, f3r, f3)
        conv(1, c, d3r)
        conv(3, d3r, d3)
        out += conv(3, d3, d3)
        out += conv(1, c, proj) if proj else c
        c = out
    trainable += c * 1000 + 1000
    assert sum(int(np.prod(w.shape)) for w in full_model.trainable_weights) == trainable
    assert full_model.count_params() == trainable + moving
    assert 11.2e6 <= trainable <= 11.3e6  # the paper's text says 13.6M; the table gives this


def test_module_outputs_and_strides(full_model):
    expected = {"mixed_3a": (28, 256), "mixed_3b": (28, 320), "mixed_3c": (14, 576), "mixed_4a": (14, 576),
                "mixed_4b": (14, 576), "mixed_4c": (14, 608), "mixed_4d": (14, 608), "mixed_4e": (7, 1056),
                "mixed_5a": (7, 1024), "mixed_5b": (7, 1024)}
    for name, (size, channels) in expected.items():
        assert full_model.get_layer(name).output.shape[1:] == (size, size, channels), name
    assert full_model.get_layer("conv1_7x7_s2").depth_multiplier == 8
    assert isinstance(full_model.get_layer("mixed_5b_max_pool"), keras.layers.MaxPooling2D)
    assert isinstance(full_model.get_layer("mixed_4a_avg_pool"), keras.layers.AveragePooling2D)


def test_bn_before_every_non_linearity_no_bias_no_lrn_no_dropout(full_model):
    layers = full_model.layers
    convs = [la for la in layers if isinstance(la, (keras.layers.Conv2D, keras.layers.SeparableConv2D))]
    assert len(convs) == sum(isinstance(la, kerasbn.BatchNormalization) for la in layers) == 69
    assert not any(la.use_bias for la in convs)
    assert not any(isinstance(la, (LocalResponseNormalization, keras.layers.Dropout)) for la in layers)
    for activation in (la for la in layers if isinstance(la, keras.layers.Activation)):
        producer = activation._inbound_nodes[0].parent_nodes[0].operation
        assert isinstance(producer, kerasbn.BatchNormalization), activation.name
    dense = [la for la in layers if isinstance(la, keras.layers.Dense)]
    assert [d.name for d in dense] == ["logits"]  # no fully-connected layer but the classifier


def test_no_bn_baseline_has_lrn_dropout_and_biases():
    model = inception(10, (32, 32, 3), width_multiplier=0.25)
    assert not any(isinstance(la, kerasbn.BatchNormalization) for la in model.layers)
    assert sum(isinstance(la, LocalResponseNormalization) for la in model.layers) == 2
    assert model.get_layer("dropout").rate == 0.4
    assert all(la.use_bias for la in model.layers if isinstance(la, keras.layers.Conv2D))


def test_lrn_matches_its_formula():
    x = np.random.RandomState(0).normal(0, 3, (2, 3, 3, 7)).astype("float32")
    y = LocalResponseNormalization(depth_radius=2, bias=1.0, alpha=2e-3, beta=0.75)(x).numpy()
    x64 = x.astype(np.float64)
    squares = np.stack([np.sum(x64[..., max(0, c - 2): c + 3] ** 2, -1) for c in range(7)], -1)
    np.testing.assert_allclose(y, x64 / (1.0 + 2e-3 * squares) ** 0.75, rtol=1e-5)


def test_scaled_down_network_and_serialization(tmp_path):
    model = bn_inception(10, (28, 28, 1), activation="sigmoid", width_multiplier=0.25, synchronized=True)
    assert model.output_shape == (None, 10)
    assert all(la.synchronized for la in model.layers if isinstance(la, kerasbn.BatchNormalization))
    assert model.get_layer("conv2_3x3").filters == 48
    x = np.random.RandomState(0).normal(size=(2, 28, 28, 1)).astype("float32")
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "m.keras")(x), model(x), atol=1e-6)
    baseline = inception(10, (28, 28, 1), width_multiplier=0.25)
    baseline.save(tmp_path / "b.keras")
    assert isinstance(keras.saving.load_model(tmp_path / "b.keras").get_layer("pool1_lrn"),
                      LocalResponseNormalization)


@pytest.mark.parametrize("stem, maps", [("imagenet", (28, 14, 7)), ("small", (14, 7, 4))])
def test_the_stems_set_the_map_each_inception_stage_sees(stem, maps):
    # The paper's stem at 224 px and the small stem at Fashion-MNIST's 28 px; the modules are the same.
    size = 224 if stem == "imagenet" else 28
    for build in (bn_inception, inception):
        model = build(10, (size, size, 1), width_multiplier=0.125, stem=stem)
        assert tuple(model.get_layer(f"mixed_{m}").output.shape[1] for m in ("3b", "4d", "5b")) == maps
        first = model.get_layer("conv1_7x7_s2" if stem == "imagenet" else "conv1_3x3")
        assert first.strides == ((2, 2) if stem == "imagenet" else (1, 1))


@pytest.mark.parametrize("name", ["inception", "bn-x30"])
def test_the_demos_networks_learn_a_batch(name):
    # The networks `make demo` and `make reproduce` train (28 px, small stem, width 0.25), built by
    # their variant and trained eagerly on one batch (the recipe's runs in tests use the tiny
    # network): every weight gets a gradient; with BN the loss falls within a few steps and the moving
    # statistics move (without BN it stays at chance for hundreds of steps: docs/recipes.md).
    import tensorflow as tf

    variant = V.VARIANTS[name]
    model = variant.build_model(10, (28, 28, 1), 0.25, bn_momentum=0.9, stem="small")
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (16, 28, 28, 1)).astype("float32")
    y = np.arange(16) % 10
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    moving = [la.moving_mean for la in model.layers if isinstance(la, kerasbn.BatchNormalization)]
    assert bool(moving) == variant.batch_norm
    before = [m.numpy().copy() for m in moving]
    losses = []
    for _ in range(6 if variant.batch_norm else 2):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_weights)
        assert all(g is not None and np.any(g.numpy() != 0) for g in gradients), name
        optimizer.apply_gradients(zip(gradients, model.trainable_weights, strict=True))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)), losses
    if variant.batch_norm:
        assert losses[-1] < losses[0] - 0.05, losses
        assert all(np.any(m.numpy() != b) for m, b in zip(moving, before, strict=True))


def test_the_real_network_folds_exactly():
    # What the recipe's export serves: every BN folded into its convolution (the separable stem's
    # pointwise kernel included), the same function in inference mode.
    model = bn_inception(10, (32, 32, 3), width_multiplier=0.125)
    rng = np.random.RandomState(0)
    for layer in model.layers:
        if isinstance(layer, kerasbn.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(size=channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
    folded = kerasbn.fold_batch_norm(model)
    assert not any(isinstance(layer, kerasbn.BatchNormalization) for layer in folded.layers)
    x = rng.uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(folded(x), model(x, training=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes"), ({"width_multiplier": 0}, "width_multiplier"),
    ({"input_shape": (32, 32)}, "input_shape"), ({"dropout": 1.0}, "dropout"), ({"stem": "cifar"}, "stem")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bn_inception(**kwargs)


# Variants -------------------------------------------------------------------------------------

def test_the_papers_variants():
    paper = {"inception": 0.0015, "bn-baseline": 0.0015, "bn-x5": 0.0075, "bn-x30": 0.045, "bn-x5-sigmoid": 0.0075}
    assert V.PAPER_VARIANTS == tuple(paper)
    base = V.VARIANTS["inception"]
    for name, lr in paper.items():
        v = V.VARIANTS[name]
        assert v.learning_rate == pytest.approx(lr)
        assert v.batch_norm == (name != "inception") and v.momentum == 0.9
        accelerated = name in ("bn-x5", "bn-x30", "bn-x5-sigmoid")
        assert v.decay_epochs == pytest.approx(base.decay_epochs / (6 if accelerated else 1))
        assert v.weight_decay == pytest.approx(base.weight_decay / (5 if accelerated else 1))
        assert v.dropout == (0.0 if accelerated else 0.4)
        assert v.distortion < base.distortion if accelerated else v.distortion == base.distortion
        assert v.activation == ("sigmoid" if name == "bn-x5-sigmoid" else "relu")
    for control, lr in (("inception-x5", 0.0075), ("inception-x30", 0.045)):
        v = V.VARIANTS[control]
        assert not v.batch_norm and v.lrn and not v.in_paper and v.learning_rate == pytest.approx(lr)
        # Only the learning rate differs from the no-BN baseline.
        assert v.decay_epochs == base.decay_epochs and v.weight_decay == base.weight_decay
        assert v.dropout == base.dropout and v.distortion == base.distortion
    with pytest.raises(ValueError, match="bn-x30"):
        V.get_variant("bn-x31")


@pytest.mark.parametrize("name", list(V.VARIANTS))
@pytest.mark.parametrize("global_batch", [32, 256])
def test_schedule_math(name, global_batch):
    v = V.VARIANTS[name]
    epoch_size = 1_281_167
    schedule = v.schedule(global_batch, epoch_size)
    steps_per_epoch = epoch_size / global_batch
    for step in (0, 1000, 123_456, 2_000_000):
        epochs = step / steps_per_epoch
        expected = v.learning_rate * global_batch / 32 * 0.96 ** (epochs / v.decay_epochs)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_warmup_then_decay():
    v = V.VARIANTS["bn-x30"]
    schedule = v.schedule(global_batch=1024, epoch_size=102_400, warmup_epochs=2)  # 100 steps/epoch
    assert float(schedule(0)) == pytest.approx(0.045)
    assert float(schedule(100)) == pytest.approx(0.045 + (0.045 * 32 - 0.045) / 2, rel=1e-5)
    assert float(schedule(300)) == pytest.approx(0.045 * 32 * 0.96 ** (3 / v.decay_epochs), rel=1e-5)
    config = schedule.get_config()
    assert float(V.StepSchedule.from_config(config)(250)) == pytest.approx(float(schedule(250)))
    with pytest.raises(ValueError, match="global_batch"):
        v.schedule(0, 100)


def test_l2_covers_kernels_only():
    model = bn_inception(10, (32, 32, 3), width_multiplier=0.125)
    for w in model.weights:
        w.assign(np.full(w.shape, 0.5, "float32"))
    kernels = [w for w in model.trainable_weights if not any(s in w.path for s in ("gamma", "beta", "bias"))]
    expected = 1e-3 * 0.5 * sum(0.25 * np.prod(w.shape) for w in kernels)
    assert float(l2_penalty(model, 1e-3)) == pytest.approx(expected, rel=1e-5)
    assert len(kernels) == 71  # 68 Conv2D, the separable stem's two kernels, the classifier
