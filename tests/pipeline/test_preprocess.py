import pytest
import torch

from pipeline._preprocess import resize_crop, resize_crop_many, stack_images, to_model_input

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_resize_crop():
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    assert resize_crop(image, 30, None).shape == (3, 30, 45)
    assert resize_crop(image, 30, (20, 24)).shape == (3, 20, 24)
    assert resize_crop(image, None, None) is image


def test_to_model_input_scales_and_normalises():
    batch = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    x = to_model_input(batch, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert torch.allclose(x, torch.ones_like(x))
    assert to_model_input(torch.rand(1, 3, 2, 2), None, channels_last=True).is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="normalisation has 3 channels but the images have 1"):
        to_model_input(torch.zeros(1, 1, 2, 2), ((0.5,) * 3, (0.5,) * 3))


def test_to_model_input_leaves_its_batch_alone_and_lays_out_the_same_values():
    g = torch.Generator().manual_seed(0)
    floats = torch.rand(2, 3, 5, 7, generator=g)
    kept = floats.clone()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = to_model_input(floats, imagenet)
    assert torch.equal(floats, kept) and x.data_ptr() != floats.data_ptr()
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=g)
    expected = (pixels.float() / 255 - torch.tensor(imagenet[0]).view(1, 3, 1, 1)) / torch.tensor(imagenet[1]).view(1, 3, 1, 1)
    plain, last = to_model_input(pixels, imagenet), to_model_input(pixels, imagenet, channels_last=True)
    assert torch.equal(plain, expected) and torch.equal(last, expected)
    assert plain.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("resize, crop", [(20, (16, 16)), (24, None), (None, (10, 12))])
def test_resize_crop_many_equals_image_by_image(resize, crop):
    # a GPU-decoded batch is resized one size at a time; the values are those of one image at a time
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
              for shape in [(3, 40, 60), (3, 40, 60), (3, 33, 50), (3, 40, 60), (3, 33, 50), (3, 70, 31)]]
    together = resize_crop_many(images, resize, crop)
    assert len(together) == len(images)
    for image, got in zip(images, together):
        assert torch.equal(got, resize_crop(image, resize, crop))


def test_stack_images_equals_torch_stack_whatever_the_layout():
    g = torch.Generator().manual_seed(0)
    hwc = [torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=g) for _ in range(4)]
    views = [image.permute(2, 0, 1) for image in hwc]  # as a JPEG decoder gives them
    planes = [view.contiguous() for view in views]
    expected = torch.stack(planes)
    for images in (views, planes, views[:2] + planes[2:], views[:1]):
        batch = stack_images(images)
        assert torch.equal(batch, expected[: len(images)])
        # decoder views: one channels-last block, the planes made in the float copy; else planes
        from_views = all(image.stride(0) == 1 for image in images)
        assert batch.is_contiguous(memory_format=torch.channels_last if from_views else torch.contiguous_format)
        for channels_last in (False, True):
            x = to_model_input(batch, IMAGENET_STATS, channels_last)
            assert torch.equal(x, to_model_input(expected[: len(images)], IMAGENET_STATS, channels_last))
            assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    floats = [p.float() / 255 for p in planes]
    assert torch.equal(stack_images(floats), torch.stack(floats))
    grey = [torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8, generator=g) for _ in range(2)]
    assert torch.equal(stack_images(grey), torch.stack(grey))


def test_an_image_smaller_than_the_crop_is_zero_padded_and_said_once(monkeypatch, caplog):
    import threading

    import pipeline._preprocess

    monkeypatch.setattr(pipeline._preprocess, "_PADDED_TOLD", threading.Event())
    image = torch.full((3, 20, 30), 7, dtype=torch.uint8)
    with caplog.at_level("WARNING", logger="pipeline._preprocess"):
        out = resize_crop(image, resize=None, crop=(24, 24))
        resize_crop(image, resize=10, crop=(24, 24))
        resize_crop(image, resize=None, crop=(16, 16))  # fits: nothing to say
    assert tuple(out.shape) == (3, 24, 24)
    assert int(out[:, :2].sum()) == 0 and bool((out[:, 2:22, :] == 7).all())  # rows padded, columns cropped
    said = [r.getMessage() for r in caplog.records]
    assert said == ["an image of 20x30 px is smaller than source.preprocess.crop 24x24 (height x width): it is "
                    "padded with zeros, as torchvision's center_crop pads; set source.preprocess.resize to at "
                    "least 24 to fill the crop (said once)"]
