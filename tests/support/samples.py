"""A source's samples as the tests compare them."""

from pipeline._sources import Deferred


def pixels(sample):
    """The sample's image as its source gave it: the tensor itself, or what loading it gives
    (a generated image is painted when it is loaded)."""
    return sample.image.load() if isinstance(sample.image, Deferred) else sample.image
