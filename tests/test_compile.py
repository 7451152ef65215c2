"""The low-latency inference path (Detector(compile=True), infer --compile, model.inference.compile):
compiled detections equal eager ones; images of many sizes compile a few times, not once per size;
on the CPU and where compiling fails it runs eagerly (also in `retinanet eval`)."""

import logging

import pytest
import torch

from retinanet import build_model, load_config
from retinanet.inference import Detector, compile_for_inference
from retinanet.modeling.anchors import feature_grid_sizes

from conftest import tiny_overrides, varied_model


def noise_images(count=2, size=128):
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, size, size + 32 * i, generator=generator) for i in range(count)]


def assert_same(ours, expected, atol):
    for got, want in zip(ours, expected):
        assert got["scores"].numel() > 10
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=atol, rtol=0)
        torch.testing.assert_close(got["scores"], want["scores"], atol=atol, rtol=0)
        assert torch.equal(got["labels"], want["labels"])


def test_compile_on_the_cpu_stays_eager(caplog):
    model, _ = varied_model()
    expected = Detector(model, "cpu").predict(noise_images())
    with caplog.at_level(logging.INFO):
        detector = Detector(model, "cpu", compile=True)
    assert not detector.compiled and "needs a GPU" in caplog.text
    assert_same(detector.predict(noise_images()), expected, atol=0)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts the compilations."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, graph_module, example_inputs):
        self.compilations += 1
        return graph_module.forward


def test_compiled_network_gives_the_eager_detections():
    model, _ = varied_model()
    expected = Detector(model, "cpu").predict(noise_images())
    detector = Detector(model, "cpu")
    assert compile_for_inference(detector.model, detector.device, backend="aot_eager")
    assert detector.compiled
    assert_same(detector.predict(noise_images()), expected, atol=1e-3)


@pytest.mark.slow  # ~50 s: five dynamo traces with symbolic shapes
def test_images_of_many_sizes_compile_a_few_times_not_once_per_size():
    """What `retinanet eval model.inference.compile=true` meets: 20 padded input shapes (10 sizes, at
    batch 1 and 3). Static shapes would compile 8 times, hit dynamo's recompile limit and run the rest
    eagerly; automatic dynamic shapes recompile once per dimension that changes."""
    model, _ = varied_model()
    model.preprocessor.max_size_test = 640  # long sides up to 640 px: padded widths 128 .. 640
    generator = torch.Generator().manual_seed(0)
    sizes = [(96, 96 + 100 * i) for i in range(5)] + [(96 + 100 * i, 96) for i in range(5)]
    images = [torch.rand(3, height, width, generator=generator) for height, width in sizes]
    eager = Detector(model, "cpu")
    expected = eager.predict(images, batch_size=1) + eager.predict(images, batch_size=3)
    backend = CountingBackend()
    detector = Detector(model, "cpu")
    compile_for_inference(detector.model, detector.device, backend=backend)
    got = detector.predict(images, batch_size=1) + detector.predict(images, batch_size=3)
    assert detector.compiled
    assert 2 <= backend.compilations <= 6
    assert sum(result["scores"].numel() for result in got) > 100
    for ours, want in zip(got, expected):
        torch.testing.assert_close(ours["boxes"], want["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(ours["scores"], want["scores"], atol=1e-4, rtol=0)
        assert torch.equal(ours["labels"], want["labels"])


def test_a_failing_compilation_falls_back_to_eager(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    model, _ = varied_model()
    expected = Detector(model, "cpu").predict(noise_images())
    detector = Detector(model, "cpu")
    assert compile_for_inference(detector.model, detector.device, backend=broken_backend)
    with caplog.at_level(logging.WARNING):
        got = detector.predict(noise_images())
    assert not detector.compiled and "running eagerly" in caplog.text
    assert_same(got, expected, atol=0)


def test_a_failing_compilation_in_training_falls_back_to_eager(caplog):
    """train.compile (RetinaNet.compile_network, one module at a time): a backend that fails does not
    end the run; the step runs eagerly and gives the eager losses."""
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    model, _ = varied_model()
    images = noise_images()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * len(images)
    expected = model.train()(images, targets)
    model.compile_network(backend=broken_backend)
    assert model.network_compiled
    with caplog.at_level(logging.WARNING):
        got = model(images, targets)
    assert not model.network_compiled and "running eagerly" in caplog.text
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    sum(got.values()).backward()


@pytest.mark.parametrize("p6_from", ["c5", "p5"])
def test_feature_grid_sizes_are_the_networks(p6_from):
    """The compiled inference graph takes anchors made outside it, for the grid sizes that
    feature_grid_sizes computes from the batch's shape: they must be the network's."""
    cfg = load_config(None, tiny_overrides() + [f"model.fpn.p6_from={p6_from}"])
    model = build_model(cfg).eval()
    for height, width in [(128, 128), (128, 384), (97, 131), (200, 33), (1, 1)]:
        with torch.no_grad():
            features, _, _ = model._network(torch.zeros(1, 3, height, width))
        assert [tuple(f.shape[-2:]) for f in features] == feature_grid_sizes(height, width, model.anchor_generator.strides)
