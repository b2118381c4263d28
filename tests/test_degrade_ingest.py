"""HR ingestion: which files are listed, and how every awkward image file is decoded or refused."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import fsspec
import numpy as np
import pytest
from PIL import Image

from dp2o.degrade import ImageRejected, SourceRef, crop_origin, list_sources, load_hr


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _png16(arr: np.ndarray) -> bytes:
    """A minimal 16-bit PNG (gray, gray+alpha, RGB or RGBA) written by hand, so tests need no other encoder."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _ref(tmp_path, name: str, data: bytes) -> SourceRef:
    path = tmp_path / name
    path.write_bytes(data)
    return SourceRef(str(path), name)


def _gradient(w: int = 40, h: int = 30) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 77)], 2
    ).astype(np.uint8)


def test_plain_rgb_png_is_returned_exactly(tmp_path):
    arr = _gradient()
    out = load_hr(_ref(tmp_path, "a.png", _png_bytes(Image.fromarray(arr))), min_size=8)
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3) and np.array_equal(out, arr)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:5, :5] = (255, 0, 0)  # red mark at the stored top-left corner
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    out = load_hr(_ref(tmp_path, "rot.jpg", buf.getvalue()), min_size=8)
    assert out.shape == (40, 20, 3)
    assert out[:5, -5:, 0].mean() > 200 and out[:5, :5, 0].mean() < 50  # mark moved to the top-right


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_is_scaled_by_rounding_not_truncation(tmp_path, channels):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(24, 24, channels), dtype=np.uint16)
    if channels in (2, 4):
        arr[..., -1] = 65535  # opaque, so the colour values come through untouched
    out = load_hr(_ref(tmp_path, "deep.png", _png16(arr if channels > 1 else arr[..., 0])), min_size=8)
    expected = np.rint(arr.astype(np.float64) / 257).astype(np.uint8)
    colour = expected[..., :1].repeat(3, 2) if channels <= 2 else expected[..., :3]
    assert out.shape == (24, 24, 3) and np.array_equal(out, colour)
    assert not np.array_equal(
        out, (arr[..., : min(channels, 3)] >> 8).astype(np.uint8).repeat(3 // min(channels, 3), 2)
    )


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([10, 20, 30] + [200, 100, 50] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, 8, 16))
    out = load_hr(_ref(tmp_path, "pal.png", _png_bytes(img, transparency=0)), min_size=8)
    assert (out[:, :8] == (200, 100, 50)).all() and (out[:, 8:] == 255).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    out = load_hr(_ref(tmp_path, "cmyk.jpg", buf.getvalue()), min_size=8)
    assert out.shape == (32, 32, 3)
    assert out[..., 0].mean() > 240 and out[..., 1].mean() < 15 and out[..., 2].mean() < 15


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    colour = (0, 0, 0, 128) if mode == "RGBA" else (0, 128)
    img = Image.new(mode, (16, 16), colour)
    out = load_hr(_ref(tmp_path, "alpha.png", _png_bytes(img)), min_size=8)
    assert out.shape == (16, 16, 3) and (out == round(255 * (1 - 128 / 255))).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = _gradient()[..., 0]
    out = load_hr(_ref(tmp_path, "g.png", _png_bytes(Image.fromarray(arr, "L"))), min_size=8)
    assert out.shape == (30, 40, 3) and all(np.array_equal(out[..., c], arr) for c in range(3))


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.png", b"", "empty file"),
        ("notes.png", b"these are my holiday notes, not a picture\n" * 4, "not an image"),
        ("trunc.png", None, "truncated"),
        ("tiny.png", None, "too small"),
    ],
)
def test_bad_files_are_rejected_with_a_reason_naming_the_file(tmp_path, name, data, reason):
    if name == "trunc.png":
        noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        full = _png_bytes(Image.fromarray(noisy))
        data = full[: len(full) // 2]
    elif name == "tiny.png":
        data = _png_bytes(Image.new("RGB", (100, 7)))
    with pytest.raises(ImageRejected, match=reason) as info:
        load_hr(_ref(tmp_path, name, data), min_size=8)
    assert name in str(info.value) and reason in info.value.reason


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    img = _png_bytes(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageRejected, match="max_pixels"):
        load_hr(_ref(tmp_path, "big.png", img), min_size=8, max_pixels=5_000)
    # a header that claims 60000 x 60000 pixels: refused from the header alone, no 10 GB allocation
    header = _png16(np.zeros((1, 1), np.uint16))
    bomb = header[:16] + struct.pack(">II", 60_000, 60_000) + header[24:]
    bomb = bomb[:29] + struct.pack(">I", zlib.crc32(bomb[12:29])) + bomb[33:]
    with pytest.raises(ImageRejected, match="bomb"):
        load_hr(_ref(tmp_path, "bomb.png", bomb), min_size=8)


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_listing_rule_for_a_folder(tmp_path):
    png = _png_bytes(Image.fromarray(_gradient()))
    for rel in ["b.png", "sub/a.JPG", "sub/deeper/c.tiff", "noext", "odd.xyz"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png)
    for rel in [
        "notes.txt",
        "meta.json",
        "README.md",
        "t.csv",
        "x.parquet",
        "c.yaml",
        ".hidden.png",
        ".cache/d.png",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png)
    refs = list_sources(str(tmp_path))
    assert [r.relpath for r in refs] == ["b.png", "noext", "odd.xyz", "sub/a.JPG", "sub/deeper/c.tiff"]
    assert refs == list_sources(str(tmp_path) + "/")  # deterministic, trailing slash irrelevant
    assert all(r.member is None for r in refs)
    assert load_hr(refs[0], min_size=8).shape == (30, 40, 3)
    assert list_sources(str(tmp_path / "b.png")) == [SourceRef(refs[0].uri, "b.png")]
    (tmp_path / "odd.xyz").write_text("listed because its extension is unknown; becomes an error row")
    assert load_hr(refs[1], min_size=8).shape == (30, 40, 3)  # "noext" is a PNG without an extension
    with pytest.raises(ImageRejected, match="odd.xyz: not an image"):
        load_hr(refs[2], min_size=8)


def test_webdataset_shards_by_glob_brace_and_folder(tmp_path):
    png = _png_bytes(Image.fromarray(_gradient()))
    for i in range(2):
        _write_tar(tmp_path / f"shard-{i}.tar", {f"{i}-a.png": png, f"{i}-a.json": b"{}", f"{i}-b.jpg": png})
    expected = [
        ("shard-0.tar", "0-a.png"),
        ("shard-0.tar", "0-b.jpg"),
        ("shard-1.tar", "1-a.png"),
        ("shard-1.tar", "1-b.jpg"),
    ]
    for uri in [str(tmp_path / "*.tar"), str(tmp_path / "shard-{0..1}.tar"), str(tmp_path)]:
        refs = list_sources(uri)
        assert [(r.relpath, r.member) for r in refs] == expected, uri
    ref = list_sources(str(tmp_path))[1]
    assert ref.name == "shard-0.tar/0-b.jpg"
    assert load_hr(ref, min_size=8).shape == (30, 40, 3)


def test_fsspec_memory_urls_and_missing_sources():
    fs = fsspec.filesystem("memory")
    png = _png_bytes(Image.fromarray(_gradient()))
    fs.pipe({"/hr-test/x/1.png": png, "/hr-test/x/2.webp": png, "/hr-test/x/readme.md": b"#"})
    refs = list_sources("memory://hr-test")
    assert [r.relpath for r in refs] == ["x/1.png", "x/2.webp"]
    assert refs[0].uri.startswith("memory://")
    assert load_hr(refs[0], min_size=8).shape == (30, 40, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_sources("memory://no-such-bucket/prefix")
    fs.rm("/hr-test", recursive=True)


def test_bundled_photos_are_listed_and_load():
    refs = list_sources("bundled://heldout")
    names = ["china.jpg", "coffee.png", "flower.jpg", "grace_hopper.jpg", "rocket.jpg"]
    assert [r.relpath for r in refs] == names
    shapes = [load_hr(r, min_size=256).shape for r in refs]
    assert shapes == [(427, 640, 3), (400, 600, 3), (427, 640, 3), (600, 512, 3), (427, 640, 3)]
    assert {r.relpath for r in list_sources("bundled://train")}.isdisjoint(names)


def test_the_extra_photos_from_pyiqa_are_a_source_the_config_accepts():
    from dp2o.config import DegradeConfig

    refs = list_sources("bundled://extra")
    assert len(refs) == 9 and all(load_hr(r, min_size=256).shape[2] == 3 for r in refs)
    assert DegradeConfig(input="bundled://extra").input == "bundled://extra"
    # `all` stays the 11 photos the recorded speed figures were measured on
    assert len(list_sources("bundled://all")) == 11
    with pytest.raises(ValueError, match="bundled://extra"):
        DegradeConfig(input="bundled://nope")


def test_crop_origin_is_deterministic_in_range_and_seed_dependent():
    assert crop_origin(600, 800, 512, 42) == crop_origin(600, 800, 512, 42)
    origins = {crop_origin(600, 800, 512, s) for s in range(50)}
    assert len(origins) > 40
    assert all(0 <= y <= 88 and 0 <= x <= 288 for y, x in origins)
    assert crop_origin(512, 512, 512, 3) == (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        crop_origin(500, 800, 512, 0)


@pytest.mark.s3
def test_s3_folder_and_tar_shards(tmp_path, monkeypatch):
    import s3fs
    from moto.server import ThreadedMotoServer

    # credentials come from the environment, never from storage options (the moto server takes any)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("degrade-ingest")
        png = _png_bytes(Image.fromarray(_gradient()))
        _write_tar(tmp_path / "shard-0.tar", {"k.png": png, "k.txt": b"caption"})
        fs.pipe({"degrade-ingest/hr/a.png": png, "degrade-ingest/hr/notes.txt": b"x"})
        fs.put(str(tmp_path / "shard-0.tar"), "degrade-ingest/shards/shard-0.tar")
        refs = list_sources("s3://degrade-ingest/hr", storage_options=opts)
        assert [(r.relpath, r.uri) for r in refs] == [("a.png", "s3://degrade-ingest/hr/a.png")]
        shard_refs = list_sources("s3://degrade-ingest/shards/shard-{0..0}.tar", storage_options=opts)
        assert [(r.relpath, r.member) for r in shard_refs] == [("shard-0.tar", "k.png")]
        for ref in refs + shard_refs:
            assert load_hr(ref, min_size=8, storage_options=opts).shape == (30, 40, 3)
    finally:
        server.stop()


def test_bundled_fingerprint_does_not_depend_on_where_scikit_image_is_installed(tmp_path, monkeypatch):
    """A second clone or a recreated virtual environment must reuse the outputs of the first."""
    import shutil

    from dp2o import data
    from dp2o.config import DegradeConfig
    from dp2o.degrade.stage import plan as plan_degrade

    cfg = DegradeConfig(input="bundled://heldout")
    here = plan_degrade(cfg, {}, None, root=str(tmp_path / "runs"), storage_options={}, runtime={})
    elsewhere = tmp_path / "other-venv" / "skimage" / "data"
    elsewhere.mkdir(parents=True)
    for p in data.bundled_files("bundled://heldout"):
        shutil.copy(p, elsewhere / p.name)
    monkeypatch.setattr(data, "bundled_path", lambda name: elsewhere / name)
    moved = plan_degrade(cfg, {}, None, root=str(tmp_path / "runs"), storage_options={}, runtime={})
    assert moved.shards[0].inputs[0][0].startswith(str(elsewhere))  # it reads from the new place ...
    assert moved.fingerprint == here.fingerprint  # ... under the same name
    # an ordinary folder is keyed by its location: the same files elsewhere are another input
    a = plan_degrade(
        DegradeConfig(input=str(elsewhere)),
        {},
        None,
        root=str(tmp_path / "runs"),
        storage_options={},
        runtime={},
    )
    shutil.copytree(elsewhere, tmp_path / "copy")
    b = plan_degrade(
        DegradeConfig(input=str(tmp_path / "copy")),
        {},
        None,
        root=str(tmp_path / "runs"),
        storage_options={},
        runtime={},
    )
    assert a.fingerprint != b.fingerprint != here.fingerprint


def test_bundled_photos_of_a_missing_package_say_what_to_install(monkeypatch):
    import importlib.util

    from dp2o import data

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "sklearn" else real(name))
    with pytest.raises(FileNotFoundError, match="pip install scikit-learn"):
        list_sources("bundled://heldout")
    assert len(data.bundled_files("bundled://train")) == 6  # the training photos need scikit-image only
