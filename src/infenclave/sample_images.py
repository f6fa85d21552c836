"""Built-in real photos that ship inside installed packages (nothing is downloaded).

Used by `make demo`, the default assessment and the tests. The set mixes subjects (animals,
objects, people, scenes, and a retinal fundus photo: the kind of sensitive image this tool
exists for). No grayscale photo: the KL/oracle method projects every feature map to a gray
image, so a gray input is "revealed" at every cut by construction (measured: skimage's
`camera` was unsafe at all 18 cut points of Lite0), which says nothing about the network.
"""

from __future__ import annotations

from pathlib import Path


def _skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _sklearn_dir() -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images"


def builtin_images() -> dict[str, Path]:
    """Name -> path of the built-in photos, in a fixed order."""
    sk, sl = _skimage_dir(), _sklearn_dir()
    return {
        "chelsea": sk / "chelsea.png",
        "coffee": sk / "coffee.png",
        "astronaut": sk / "astronaut.png",
        "rocket": sk / "rocket.jpg",
        "motorcycle": sk / "motorcycle_left.png",
        "china": sl / "china.jpg",
        "flower": sl / "flower.jpg",
        "retina": sk / "retina.jpg",
    }
