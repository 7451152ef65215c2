import torch

from retinanet.modeling import Preprocessor


def make(min_train=(64,), max_train=1000, min_test=64, max_test=1000, divisibility=32):
    return Preprocessor(list(min_train), max_train, min_test, max_test, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], divisibility)


def test_resized_boxes_still_enclose_their_pixels():
    """Round trip against the image: a bright rectangle's box, scaled with the image, bounds it."""
    image = torch.zeros(3, 40, 60)
    image[:, 10:30, 20:50] = 1.0  # box x1=20, y1=10, x2=50, y2=30
    target = {"boxes": torch.tensor([[20.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([0])}
    pre = make(min_train=(80,)).train()  # scale 2
    batch, sizes, original, targets = pre([image], [target])
    assert sizes == [(80, 120)] and original == [(40, 60)]
    assert batch.shape == (1, 3, 96, 128)  # padded to multiples of 32
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[40.0, 20.0, 100.0, 60.0]]))
    bright = batch[0, 0] > 0.5
    ys, xs = torch.where(bright)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (40, 20, 100, 60)
    assert not bright[80:].any() and not bright[:, 120:].any()  # padding is zero


def test_max_size_caps_the_long_side_and_restore_maps_back():
    pre = make(min_test=100, max_test=150).eval()
    image = torch.rand(3, 50, 200)  # short side 100 would make the long side 400 > 150
    batch, sizes, original, _ = pre([image])
    assert sizes == [(37, 150)]
    detections = [{"boxes": torch.tensor([[0.0, 0.0, 150.0, 37.0]])}]
    restored = pre.restore(detections, sizes, original)
    torch.testing.assert_close(restored[0]["boxes"], torch.tensor([[0.0, 0.0, 200.0, 50.0]]))


def test_uint8_and_float_inputs_agree_and_are_normalised():
    pre = Preprocessor([32], 1000, 32, 1000, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 32).eval()
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    from_uint8, *_ = pre([image])
    from_float, *_ = pre([image.float() / 255])
    torch.testing.assert_close(from_uint8, from_float)
    torch.testing.assert_close(from_float[0], (image.float() / 255 - 0.5) / 0.25)


def test_multi_scale_training_draws_from_the_configured_sizes():
    pre = make(min_train=(32, 48, 64)).train()
    torch.manual_seed(0)
    seen = {pre([torch.rand(3, 16, 16)])[1][0][0] for _ in range(30)}
    assert seen == {32, 48, 64}
