"""Bundled HR photos: colour photographs that ship inside the wheels of dp2o's own dependencies (scikit-image,
matplotlib, scikit-learn, pyiqa), so the demo and the miniature reproduction need no download.

`bundled://train`, `bundled://heldout`, `bundled://extra` and `bundled://all` are accepted wherever an HR source
URL is; they resolve to files in the installed packages. The held-out split is never used for training or
pretraining. `extra` holds nine more photographs that pyiqa's wheel installs (five Kodak-derived reference images
of its calibration set, four of its speed-test photos); the tiny model never saw them, and the controlled
miniature (docs/mini_controls.md) splits them between its training and held-out photos. `all` stays the 11
photos of `train` and `heldout`, which the recorded speed figures were measured on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_SCHEME = "bundled://"

#: natural colour photographs shipped in dependency wheels (synthetic and grayscale-only images left out;
#: skimage's motorcycle_right is left out because it is a stereo twin of motorcycle_left and would leak into the
#: held-out split). The held-out split is every other such photograph we found: scipy.datasets and imageio fetch
#: theirs from the network, so they cannot be bundled.
BUNDLED_PHOTOS: dict[str, tuple[str, ...]] = {
    "train": (
        "astronaut.png",
        "chelsea.png",
        "hubble_deep_field.jpg",
        "motorcycle_left.png",
        "retina.jpg",
        "ihc.png",
    ),
    "heldout": ("coffee.png", "rocket.jpg", "grace_hopper.jpg", "china.jpg", "flower.jpg"),
    "extra": (
        "I03.bmp",
        "I04.bmp",
        "I06.bmp",
        "I08.bmp",
        "I19.bmp",
        "SPAQ_10241.jpg",
        "frame_4wrwr48cdk6rbcjl.jpg",
        "frame_7gzdcz9sif0ekg31.jpg",
        "frame_9ogwhvvy7gfj6jzh.jpg",
    ),
}

#: where each package keeps its sample photos: import name -> (folder inside the package, name to pip install)
_PACKAGE_DIRS: dict[str, tuple[str, str]] = {
    "skimage": ("data", "scikit-image"),
    "matplotlib": ("mpl-data/sample_data", "matplotlib"),
    "sklearn": ("datasets/images", "scikit-learn"),
}
#: the package of each photo that is not scikit-image's
_PHOTO_PACKAGE: dict[str, str] = {
    "grace_hopper.jpg": "matplotlib",
    "china.jpg": "sklearn",
    "flower.jpg": "sklearn",
}
#: photos that pyiqa's wheel installs beside (not inside) its package, as files of its distribution record
_PYIQA_FILES: dict[str, str] = {
    **{f"I{k}.bmp": f"ResultsCalibra/ref_dir/I{k}.bmp" for k in ("03", "04", "06", "08", "19")},
    **{
        name: f"tests/test_efficiency_img_dir/{name}"
        for name in (
            "SPAQ_10241.jpg",
            "frame_4wrwr48cdk6rbcjl.jpg",
            "frame_7gzdcz9sif0ekg31.jpg",
            "frame_9ogwhvvy7gfj6jzh.jpg",
        )
    },
}


def package_dir(package: str) -> Path:
    """The folder of sample photos inside an installed package (`skimage`, `matplotlib` or `sklearn`)."""
    sub, pip_name = _PACKAGE_DIRS[package]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the bundled photos need the package {pip_name!r}, which is not installed; pip install {pip_name}"
        )
    return Path(spec.origin).parent / sub


def bundled_dir() -> Path:
    """The folder of scikit-image's bundled data files (most bundled photos live there)."""
    return package_dir("skimage")


def pyiqa_file(name: str) -> Path:
    """The installed file of one of the photos pyiqa's wheel ships (they sit in site-packages beside `pyiqa/`)."""
    from importlib import metadata

    try:
        return Path(str(metadata.distribution("pyiqa").locate_file(_PYIQA_FILES[name])))
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the bundled photo {name} ships with pyiqa, which is not installed; pip install pyiqa"
        ) from None


def bundled_path(name: str) -> Path:
    """The installed file of one bundled photo."""
    if name in _PYIQA_FILES:
        return pyiqa_file(name)
    package = _PHOTO_PACKAGE.get(name, "skimage")
    return (bundled_dir() if package == "skimage" else package_dir(package)) / name


def is_bundled(uri: str) -> bool:
    return uri.startswith(BUNDLED_SCHEME)


def bundled_files(uri: str) -> list[Path]:
    """Paths of the photos named by `bundled://<split>` (`train`, `heldout` or `all`)."""
    split = uri[len(BUNDLED_SCHEME) :].strip("/")
    if split == "all":
        names = (
            BUNDLED_PHOTOS["train"] + BUNDLED_PHOTOS["heldout"]
        )  # the 11 the speed figures were measured on
    elif split in BUNDLED_PHOTOS:
        names = BUNDLED_PHOTOS[split]
    else:
        raise ValueError(
            f"unknown bundled split {split!r} in {uri!r}; use one of: "
            + ", ".join(f"{BUNDLED_SCHEME}{s}" for s in [*BUNDLED_PHOTOS, "all"])
        )
    paths = [bundled_path(n) for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        packages = sorted(
            {
                "pyiqa" if n in _PYIQA_FILES else _PACKAGE_DIRS[_PHOTO_PACKAGE.get(n, "skimage")][1]
                for n, p in zip(names, paths, strict=True)
                if not p.exists()
            }
        )
        raise FileNotFoundError(
            f"bundled photos {missing} are missing; reinstall {', '.join(packages)} (pip install --force-reinstall)"
        )
    return paths
