"""Stochastic depth: each residual branch dropped per sample, rates growing with depth.

``insert_dropout(model, linear(r), where=residual_branches(), kind="stochastic_depth")``
on ResNet50 (16 residual Adds) and ConvNeXtTiny (18 blocks): the plan's sites and rates,
each sample's branch either all zeros or scaled by 1/(1-rate) in training, bitwise
inference, and a saved model that plain Keras loads.
"""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy

import multidrop
from multidrop import select

RATE = 0.6  # at the last site: high enough that branches are both kept and dropped
BATCH = 32


OPTIONS = dict(
    rate=multidrop.linear(RATE), where=select.residual_branches(), kind="stochastic_depth", seed=3
)


def build(name: str, size: int):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)
    x = np.random.default_rng(0).uniform(0, 255, size=(BATCH, size, size, 3)).astype("float32")
    before = snapshot(model)
    plan = multidrop.plan(model, **OPTIONS)
    rewired = multidrop.insert_dropout(model, **OPTIONS)
    assert_snapshot_equal(before, snapshot(model))
    return model, plan, rewired, x, to_numpy(model(x, training=False))


@pytest.fixture(scope="module")
def resnet():
    return build("ResNet50", 64)


@pytest.fixture(scope="module")
def convnext():
    return build("ConvNeXtTiny", 32)


def resnet_branches() -> list[str]:
    """ResNet50's residual branches end in the block's third BatchNormalization."""
    return [
        f"conv{stage}_block{block}_3_bn"
        for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3))
        for block in range(1, blocks + 1)
    ]


def convnext_branches() -> list[str]:
    """ConvNeXtTiny leaves a linear ``*_identity`` Activation where the drop path goes."""
    return [
        f"convnext_tiny_stage_{stage}_block_{block}_identity"
        for stage, blocks in enumerate((3, 3, 9, 3))
        for block in range(blocks)
    ]


@pytest.mark.parametrize(
    "fixture, expected", [("resnet", resnet_branches), ("convnext", convnext_branches)]
)
def test_plan_lists_every_branch_with_linear_rates(fixture, expected, request):
    model, plan, rewired, _, _ = request.getfixturevalue(fixture)
    names = expected()
    assert [site.qualname for site in plan] == names
    count = len(names)
    assert count == {"resnet": 16, "convnext": 18}[fixture]
    np.testing.assert_allclose(
        [site.rate for site in plan], [RATE * i / (count - 1) for i in range(count)], rtol=1e-12
    )
    shapes = {(site.kind, site.layer.noise_shape) for site in plan}
    assert shapes == {("Dropout", (None, 1, 1, 1))}
    # The rewired model holds exactly these layers, one after each branch.
    added = [
        layer
        for layer in rewired._flatten_layers()
        if isinstance(layer, keras.layers.Dropout) and layer.name.endswith("_multidrop")
    ]
    assert [layer.name for layer in added] == [site.name for site in plan]
    assert [layer.rate for layer in added] == [site.rate for site in plan]
    assert len(model.layers) + count == len(rewired.layers)


@pytest.mark.parametrize("fixture", ["resnet", "convnext"])
def test_inference_is_bitwise(fixture, request):
    _, _, rewired, x, reference = request.getfixturevalue(fixture)
    assert_identical(reference, rewired(x, training=False))


@pytest.mark.parametrize("fixture", ["resnet", "convnext"])
def test_training_drops_whole_samples_and_rescales_the_rest(fixture, request):
    _, plan, rewired, x, _ = request.getfixturevalue(fixture)
    outputs = []
    for site in plan:
        outputs += [rewired.get_layer(site.qualname).output, rewired.get_layer(site.name).output]
    probe = keras.Model(rewired.input, outputs)
    state = rewired.get_weights()
    values = to_numpy(probe(x, training=True))
    rewired.set_weights(state)  # training moved BatchNormalization's statistics: put them back

    dropped = []
    for site, branch, after in zip(plan, values[::2], values[1::2]):
        scaled = branch * np.float32(1 / (1 - site.rate))
        zeros = [bool(np.all(sample == 0)) for sample in after]
        for sample, is_zero in enumerate(zeros):
            assert np.any(branch[sample] != 0)
            if not is_zero:
                np.testing.assert_allclose(after[sample], scaled[sample], rtol=1e-6, atol=0)
        dropped.append(sum(zeros))
        if site.rate >= 0.3:  # both cases occur (each misses with probability < 2e-5)
            assert 0 < dropped[-1] < BATCH, (site.qualname, site.rate, dropped[-1])
    assert dropped[0] == 0  # rate 0 at the first site
    # The dropped count follows the planned rates: within 5 standard deviations.
    rates = np.array([site.rate for site in plan])
    expected, sd = BATCH * rates.sum(), np.sqrt(BATCH * (rates * (1 - rates)).sum())
    print(
        f"{fixture}: {sum(dropped)} of {BATCH * len(plan)} branches dropped, "
        f"expected {expected:.1f} +- {sd:.1f}; per site {dropped}"
    )
    assert abs(sum(dropped) - expected) < 5 * sd


LOAD = """
import json, sys
import keras, numpy as np
model = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(np.load(sys.argv[2]), training=False)))
drops = [(type(l).__module__.split(".")[0], l.name, l.rate, list(l.noise_shape))
         for l in model.layers if isinstance(l, keras.layers.Dropout)]
print(json.dumps({"multidrop": "multidrop" in sys.modules, "dropouts": drops}))
"""


def test_resnet_keras_file_loads_with_plain_keras(resnet, tmp_path):
    _, plan, rewired, x, reference = resnet
    rewired.save(tmp_path / "sd.keras")
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [sys.executable, "-c", LOAD, tmp_path / "sd.keras", tmp_path / "x.npy", tmp_path / "y.npy"],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["multidrop"] is False
    assert report["dropouts"] == [["keras", site.name, site.rate, [None, 1, 1, 1]] for site in plan]
    assert np.array_equal(np.load(tmp_path / "y.npy"), reference)
