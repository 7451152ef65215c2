import pytest
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


def test_extreme_aspect_ratio_keeps_every_side_at_least_one_pixel_and_restores():
    """1x5000 with the long side capped at 100: scale 0.02 would floor the short side to 0 px."""
    pre = make(min_test=64, max_test=100).eval()
    batch, sizes, original, _ = pre([torch.rand(3, 1, 5000), torch.rand(3, 5000, 1), torch.rand(3, 2, 3000)])
    assert sizes == [(1, 100), (100, 1), (1, 100)]
    assert batch.shape == (3, 3, 128, 128)
    detections = [{"boxes": torch.tensor([[0.0, 0.0, 100.0, 1.0]])}, {"boxes": torch.tensor([[0.0, 0.0, 1.0, 100.0]])},
                  {"boxes": torch.tensor([[50.0, 0.0, 100.0, 1.0]])}]
    restored = pre.restore(detections, sizes, original)
    torch.testing.assert_close(restored[0]["boxes"], torch.tensor([[0.0, 0.0, 5000.0, 1.0]]))
    torch.testing.assert_close(restored[1]["boxes"], torch.tensor([[0.0, 0.0, 1.0, 5000.0]]))
    torch.testing.assert_close(restored[2]["boxes"], torch.tensor([[1500.0, 0.0, 3000.0, 2.0]]))


def test_extreme_aspect_ratio_resizes_along_the_long_side_only():
    """1x400 -> 1x100: output pixel i samples the input at x = (i + 0.5) * 4 - 0.5 (bilinear,
    align_corners=False), halfway between pixels 4i + 1 and 4i + 2 of a ramp 0, 1, 2, ..."""
    pre = make(min_test=64, max_test=100).eval()
    resized = pre._resize(torch.arange(400.0).expand(3, 1, 400))
    torch.testing.assert_close(resized, (4 * torch.arange(100.0) + 1.5).expand(3, 1, 100))


def test_no_images_or_an_image_without_pixels_is_refused_by_name():
    preprocessor = make().eval()
    with pytest.raises(ValueError, match=r"got no images"):
        preprocessor([])
    with pytest.raises(ValueError, match=r"image 1: has no pixels \(shape \(3, 0, 5\)\)"):
        preprocessor([torch.rand(3, 8, 8), torch.rand(3, 0, 5)])
