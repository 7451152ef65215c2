"""Drawings people can read: label size scaled with the image (measured on the drawn pixels), a
filled label with contrasting text above the box (inside when there is no room), one label per box."""

import pytest
import torch

from retinanet.visualize import (
    class_color,
    draw_detections,
    draw_style,
    group_same_boxes,
    relative_luminance,
    text_color,
)

GRAY = 128  # the background: no class colour and no text colour is this gray
CLASS_NAMES = ("cat", "dog", "bird")


def gray_image(height, width):
    return torch.full((3, height, width), GRAY, dtype=torch.uint8)


def detections(boxes, labels, scores):
    labels = torch.tensor(labels)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores), "labels": labels,
            "class_names": [CLASS_NAMES[label] for label in labels.tolist()]}


def pixels_of(image, color):
    """(H, W) bool: where `image` has exactly this RGB colour."""
    return (image == torch.tensor(color, dtype=torch.uint8)[:, None, None]).all(dim=0)


def rows_with(image, color, below=None):
    """Rows holding at least one pixel of `color` (only rows < `below` if given)."""
    rows = pixels_of(image, color).any(dim=1).nonzero().flatten().tolist()
    return [row for row in rows if below is None or row < below]


def test_label_height_scales_with_a_4000px_photo():
    """A label of ~10 px on a 4000x2667 photo is unreadable once the photo is shown on a screen."""
    box_top = 1000
    drawn = draw_detections(gray_image(2667, 4000), detections([[1000, box_top, 2000, 1800]], [0], [0.91]))
    label_rows = rows_with(drawn, class_color(0), below=box_top)
    assert len(label_rows) >= 0.015 * 2667
    assert label_rows == list(range(box_top - len(label_rows), box_top))  # one band, right above the box
    band = drawn[:, label_rows[0] : label_rows[-1] + 1, 1000:1600]
    assert int(pixels_of(band, text_color(class_color(0))).sum()) > 500  # the text, in the contrasting colour


def test_label_on_a_small_image_is_at_least_12px():
    drawn = draw_detections(gray_image(150, 200), detections([[40, 60, 160, 140]], [1], [0.5]))
    label_rows = rows_with(drawn, class_color(1), below=60)
    assert len(label_rows) >= 12 and label_rows[-1] == 59


def test_label_goes_inside_the_box_when_there_is_no_room_above():
    drawn = draw_detections(gray_image(150, 200), detections([[40, 0, 160, 140]], [1], [0.5]))
    line_width = draw_style(150, 200).line_width
    row = drawn[:, line_width + 2]  # a row inside the box, just under its top edge
    # the box's own sides give 2 * line_width pixels of its colour in this row; the label many more
    assert int(pixels_of(row[:, None, :], class_color(1)).sum()) > 40


def test_several_classes_on_one_box_share_one_label():
    """cat and dog found on the same box (to 0.5 px): one label "cat 0.91 | dog 0.44" in one row,
    not two labels printed over each other."""
    box_top = 60
    both = detections([[50, box_top, 150, 140], [50.4, 60.3, 150.2, 139.6]], [0, 1], [0.91, 0.44])
    drawn = draw_detections(gray_image(150, 200), both)
    cat_rows = rows_with(drawn, class_color(0), below=box_top)
    dog_rows = rows_with(drawn, class_color(1), below=box_top)
    alone = draw_detections(gray_image(150, 200), detections([[50, box_top, 150, 140]], [0], [0.91]))
    assert cat_rows == dog_rows == rows_with(alone, class_color(0), below=box_top)
    band = slice(cat_rows[0], cat_rows[-1] + 1)
    cat_columns = pixels_of(drawn[:, band], class_color(0)).any(dim=0).nonzero().flatten()
    dog_columns = pixels_of(drawn[:, band], class_color(1)).any(dim=0).nonzero().flatten()
    assert int(cat_columns.max()) < int(dog_columns.min())  # side by side, best first


def test_boxes_within_one_pixel_are_grouped():
    boxes = torch.tensor([[0, 0, 10, 10], [0.5, 0.5, 10.5, 10], [0, 0, 12, 10], [0.9, 0, 10, 10.9], [0, 0, 12.5, 10]])
    assert group_same_boxes(boxes) == [[0, 1, 3], [2, 4]]
    assert group_same_boxes(torch.zeros(0, 4)) == []


@pytest.mark.parametrize(("height", "width", "font_size"), [(2667, 4000, 48), (4000, 2667, 48), (150, 200, 12), (600, 800, 12)])
def test_sizes_scale_with_the_short_side(height, width, font_size):
    style = draw_style(height, width)
    assert style.font_size == font_size and style.line_width == max(1, round(font_size / 6))


def test_text_colour_contrasts_with_every_class_colour():
    assert text_color((240, 230, 40)) == (0, 0, 0) and text_color((40, 40, 200)) == (255, 255, 255)
    for label in range(80):
        background = class_color(label)
        lighter, darker = sorted((relative_luminance(background), relative_luminance(text_color(background))), reverse=True)
        assert (lighter + 0.05) / (darker + 0.05) >= 4.5  # WCAG AA for normal text


def test_no_detection_leaves_the_image_as_it_was():
    image = gray_image(20, 30)
    drawn = draw_detections(image, detections(torch.zeros(0, 4).tolist(), [], []))
    assert torch.equal(drawn, image)
