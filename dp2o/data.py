"""Bundled HR photos: colour photographs that ship inside the scikit-image wheel, so the demo needs no download.

`bundled://train` and `bundled://heldout` are accepted wherever an HR source URL is; they resolve to files in
the installed scikit-image package. The held-out split is never used for training or pretraining.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_SCHEME = "bundled://"

#: natural colour photographs in skimage/data (synthetic and grayscale-only images left out; motorcycle_right is
#: left out because it is a stereo twin of motorcycle_left and would leak into the held-out split)
BUNDLED_PHOTOS: dict[str, tuple[str, ...]] = {
    "train": (
        "astronaut.png",
        "chelsea.png",
        "hubble_deep_field.jpg",
        "motorcycle_left.png",
        "retina.jpg",
        "ihc.png",
    ),
    "heldout": ("coffee.png", "rocket.jpg"),
}


def bundled_dir() -> Path:
    """The folder of scikit-image's bundled data files."""
    import skimage.data

    return Path(skimage.data.__file__).parent


def is_bundled(uri: str) -> bool:
    return uri.startswith(BUNDLED_SCHEME)


def bundled_files(uri: str) -> list[Path]:
    """Paths of the photos named by `bundled://<split>` (`train`, `heldout` or `all`)."""
    split = uri[len(BUNDLED_SCHEME) :].strip("/")
    if split == "all":
        names = BUNDLED_PHOTOS["train"] + BUNDLED_PHOTOS["heldout"]
    elif split in BUNDLED_PHOTOS:
        names = BUNDLED_PHOTOS[split]
    else:
        raise ValueError(
            f"unknown bundled split {split!r} in {uri!r}; use one of: "
            + ", ".join(f"{BUNDLED_SCHEME}{s}" for s in [*BUNDLED_PHOTOS, "all"])
        )
    root = bundled_dir()
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"scikit-image data files {missing} are missing under {root}; reinstall scikit-image"
        )
    return [root / n for n in names]
