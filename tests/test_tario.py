"""Image shards keep webdataset's layout: webdataset itself streams them, sample by sample, with our bytes."""

from __future__ import annotations

import numpy as np

from dp2o.tario import TarReader, decode_png, encode_png, write_tar


def test_webdataset_streams_our_shards_as_samples(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    images = {f"photo_{i}-1a2b3c4d-c0{i}": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(3)}
    members = []
    for key, img in images.items():
        members += [(f"{key}.hr.png", encode_png(img)), (f"{key}.lr.png", encode_png(img[::2, ::2]))]
    path = tmp_path / "shard-00000.tar"
    write_tar(path, members)
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == list(images)
    for s in samples:
        assert set(s) >= {"hr.png", "lr.png"}
        np.testing.assert_array_equal(decode_png(s["hr.png"]), images[s["__key__"]])
    with TarReader(path) as tar:
        np.testing.assert_array_equal(
            tar.image(f"{next(iter(images))}.lr.png"), next(iter(images.values()))[::2, ::2]
        )
