"""Re-stated torchvision.models entry points used by pytorch-fid (inception_v3) and lpips (alexnet, vgg16)."""

from . import inception  # noqa: F401
from .inception import Inception3, inception_v3  # noqa: F401
from .small import alexnet, vgg16  # noqa: F401
