"""Finding HR source images and decoding them into clean 8-bit RGB arrays.

`list_sources` turns one URL into a sorted list of `SourceRef`s: a local folder (recursive), any fsspec URL
(s3://, memory://, file://), a single file, webdataset `.tar` shards (each image member is one source) given
as a file, folder, glob or brace pattern (`shards-{000..009}.tar`), or `bundled://train|heldout|extra|all`.
Listing rule: files (and tar members) with an image extension (png jpg jpeg webp bmp tif tiff, any case) and
files with an unknown or no extension are listed — the latter so that a mislabelled or broken file becomes
an error row instead of silently vanishing; obvious non-images (txt json jsonl md csv tsv parquet yaml yml
log) are skipped silently, and so are hidden files and folders (a name starting with ".").

`load_hr` never "fixes" a bad file silently: anything it cannot turn into a trustworthy RGB image raises
`ImageRejected` with a reason, which the stage records as an error row. Transparent pixels are composited
on white (what a viewer shows for most photos with alpha); 16-bit images are scaled to 8 bits by rounding
v/257 — decoded with OpenCV for 16-bit colour, because Pillow truncates those to their high byte.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dp2o.data import bundled_files, is_bundled
from dp2o.seeding import derive_seed, numpy_rng

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"})
SKIPPED_EXTENSIONS = frozenset({"txt", "json", "jsonl", "md", "csv", "tsv", "parquet", "yaml", "yml", "log"})
#: Pillow's own refusal threshold (2 × Image.MAX_IMAGE_PIXELS), the default decompression-bomb limit
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class SourceRef:
    """One HR source. `uri` is the file's fsspec URL (for a tar member: the tar's URL), `relpath` its path
    relative to the listed root, `member` the member name inside a webdataset tar (None for plain files)."""

    uri: str
    relpath: str
    member: str | None = None

    @property
    def name(self) -> str:
        """A readable, unique-per-listing name: relpath, plus "/member" for tar members."""
        return self.relpath if self.member is None else f"{self.relpath}/{self.member}"


class ImageRejected(Exception):
    """A source that cannot be used as an HR image. `reason` says why; str(e) is "<source>: <reason>" when
    the source is given (always, when raised by `load_hr`)."""

    def __init__(self, reason: str, source: str | None = None):
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source


def _extension(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[1].lower() if "." in base.lstrip(".") else ""


def _is_hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/") if part)


def _wanted(relpath: str) -> bool:
    return not _is_hidden(relpath) and _extension(relpath) not in SKIPPED_EXTENSIONS


def _tar_members(fs, path: str) -> list[str]:
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        return [m.name for m in tar.getmembers() if m.isfile() and _wanted(m.name)]


def _refs_for_file(fs, path: str, relpath: str) -> list[SourceRef]:
    uri = fs.unstrip_protocol(path)
    if _extension(path) == "tar":
        try:
            members = _tar_members(fs, path)
        except tarfile.TarError as e:
            raise ValueError(f"{uri} is not a readable tar archive ({e}); remove it or fix the shard") from e
        return [SourceRef(uri, relpath, m) for m in members]
    return [SourceRef(uri, relpath)]


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _static_prefix(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard (relpaths are taken relative to it)."""
    head = pattern
    for i, c in enumerate(pattern):
        if c in "*?[":
            head = pattern[:i]
            break
    return head.rsplit("/", 1)[0] if "/" in head else ""


def list_sources(uri: str, storage_options: dict | None = None) -> list[SourceRef]:
    """All HR sources under `uri`, sorted by (relpath, member); see the module docstring for the rules.

    Raises FileNotFoundError if `uri` matches nothing, ValueError for an unreadable .tar shard.
    """
    if is_bundled(uri):
        return sorted((SourceRef(str(p), p.name) for p in bundled_files(uri)), key=lambda r: r.relpath)
    from braceexpand import braceexpand  # a webdataset dependency

    refs: list[SourceRef] = []
    for pattern in braceexpand(uri):
        fs, path = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
        if _has_magic(path):
            root = _static_prefix(path)
            for match in sorted(fs.glob(path)):
                rel = posixpath.relpath(match, root) if root else match
                if fs.isfile(match) and _wanted(rel):
                    refs.extend(_refs_for_file(fs, match, rel))
        elif fs.isdir(path):
            root = path.rstrip("/")
            for found in sorted(fs.find(root)):
                rel = posixpath.relpath(found, root)
                if _wanted(rel):
                    refs.extend(_refs_for_file(fs, found, rel))
        elif fs.isfile(path):
            refs.extend(_refs_for_file(fs, path, posixpath.basename(path)))
        else:
            raise FileNotFoundError(f"HR source {pattern!r} does not exist (no file, folder or glob match)")
    if not refs and any(True for _ in braceexpand(uri)):
        raise FileNotFoundError(
            f"HR source {uri!r} holds no image files (extensions: {sorted(IMAGE_EXTENSIONS)})"
        )
    return sorted(set(refs), key=lambda r: (r.relpath, r.member or ""))


def _read_bytes(ref: SourceRef, storage_options: dict | None) -> bytes:
    with fsspec.open(ref.uri, "rb", **(storage_options or {})) as f:
        if ref.member is None:
            return f.read()
        with tarfile.open(fileobj=f, mode="r:*") as tar:
            member = tar.extractfile(ref.member)
            if member is None:
                raise ImageRejected(source=ref.name, reason="tar member is not a regular file")
            return member.read()


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.rint(rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _sixteen_bit_to_uint8(x: np.ndarray) -> np.ndarray:
    return ((np.clip(x, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)


def _is_deep_colour(im: Image.Image) -> bool:
    """True for 16-bit-per-channel colour images, which Pillow decodes by dropping the low byte."""
    return im.mode in ("RGB", "RGBA", "LA") and any(";16" in str(t.args) for t in im.tile)


def _decode_deep_colour(data: bytes, im: Image.Image, name: str) -> np.ndarray:
    import cv2  # a pyiqa dependency; only needed for 16-bit colour

    x = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if x is None or x.dtype != np.uint16 or x.ndim != 3:
        raise ImageRejected(source=name, reason="16-bit colour image could not be decoded")
    x = _sixteen_bit_to_uint8(x)
    rgb = x[..., 2::-1] if x.shape[2] >= 3 else np.repeat(x[..., :1], 3, axis=2)
    alpha = x[..., 3] if x.shape[2] == 4 else (x[..., 1] if x.shape[2] == 2 else None)
    out = _composite_on_white(rgb, alpha) if alpha is not None else np.ascontiguousarray(rgb)
    # OpenCV ignores EXIF orientation with IMREAD_UNCHANGED; apply Pillow's reading of it.
    orientation = im.getexif().get(0x0112, 1)
    return np.asarray(ImageOps.exif_transpose(Image.fromarray(out)) if orientation != 1 else out)


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = _sixteen_bit_to_uint8(np.asarray(im, dtype=np.int64))
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise ImageRejected(
            source=name, reason="32-bit float images are not supported; convert to 8- or 16-bit integers"
        )
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        return _composite_on_white(rgba[..., :3], rgba[..., 3])
    return np.asarray(im.convert("RGB"))


def load_hr(
    ref: SourceRef,
    *,
    min_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_options: dict | None = None,
) -> np.ndarray:
    """Decode one HR source into uint8 [H, W, 3] RGB (values 0..255), EXIF orientation applied.

    Palette, CMYK, grayscale (8/16-bit) and alpha images become RGB (alpha composited on white); only the
    first frame of multi-frame files is used. Raises ImageRejected for empty, unreadable, truncated or
    non-image files, images with more than `max_pixels` pixels, and images smaller than `min_size` on
    either side (after orientation).
    """
    name = ref.name
    data = _read_bytes(ref, storage_options)
    if not data:
        raise ImageRejected(source=name, reason="empty file (0 bytes)")
    # Pillow warns (DecompressionBombWarning) for images between its own limits; we do not silence that with
    # warnings.catch_warnings, which is not thread-safe and degrade shards run in threads.
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise ImageRejected(
                source=name,
                reason=f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} (decompression bomb?)",
            )
        if _is_deep_colour(im):
            rgb = _decode_deep_colour(data, im, name)
        else:
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im), name)
    except Image.DecompressionBombError as e:
        raise ImageRejected(source=name, reason=f"decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageRejected(
            source=name, reason="not an image (no decoder recognises the file's content)"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(source=name, reason=f"unreadable or truncated image: {e}") from e
    h, w = rgb.shape[:2]
    if min(h, w) < min_size:
        raise ImageRejected(
            source=name, reason=f"too small: {w}x{h}, both sides must be at least {min_size} px"
        )
    return np.require(rgb, requirements=["C", "W"])  # a writable array: torch.from_numpy warns on read-only


def crop_origin(h: int, w: int, size: int, seed: int) -> tuple[int, int]:
    """(y, x) of a uniformly random size×size crop of an h×w image, drawn from `seed` (the same per-sample
    seed passed to `sample_params`; the crop uses its own derived stream)."""
    if size > h or size > w:
        raise ValueError(f"crop size {size} does not fit a {w}x{h} image")
    rng = numpy_rng(derive_seed(seed, "degrade", "crop"))
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
