"""The low-latency inference path (Detector(compile=True), infer --compile, model.inference.compile):
compiled detections equal eager ones; on the CPU and where compiling fails it runs eagerly."""

import logging

import torch

from retinanet.inference import Detector, compile_for_inference

from conftest import varied_model


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


def test_compiled_network_gives_the_eager_detections():
    model, _ = varied_model()
    expected = Detector(model, "cpu").predict(noise_images())
    detector = Detector(model, "cpu")
    detector.compiled = compile_for_inference(detector.model, detector.device, backend="aot_eager")
    try:
        assert detector.compiled
        assert_same(detector.predict(noise_images()), expected, atol=1e-3)
    finally:
        model.uncompile_network()


def test_a_failing_compilation_falls_back_to_eager(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    model, _ = varied_model()
    expected = Detector(model, "cpu").predict(noise_images())
    detector = Detector(model, "cpu")
    detector.compiled = compile_for_inference(detector.model, detector.device, backend=broken_backend)
    with caplog.at_level(logging.WARNING):
        got = detector.predict(noise_images())
    assert not detector.compiled and "running eagerly" in caplog.text
    assert_same(got, expected, atol=0)
