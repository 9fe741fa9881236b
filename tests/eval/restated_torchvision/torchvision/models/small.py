"""torchvision's AlexNet / VGG16 `features` stacks, re-stated for the lpips parity test (module indices as in
torchvision, so `features.<i>.weight` keys match). Facts from torchvision/models/alexnet.py and vgg.py (cfg "D")."""

from torch import nn


class _Net(nn.Module):
  def __init__(self, features):
    super().__init__()
    self.features = features


def alexnet(pretrained=False, weights=None, **kw):
  if pretrained or weights is not None:
    raise RuntimeError("restated torchvision: no pretrained weights (tests use random weights)")
  return _Net(nn.Sequential(
      nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2)))


def vgg16(pretrained=False, weights=None, **kw):
  if pretrained or weights is not None:
    raise RuntimeError("restated torchvision: no pretrained weights (tests use random weights)")
  layers, cin = [], 3
  for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      cin = v
  return _Net(nn.Sequential(*layers))
