"""The run root can be s3://: the whole chain writes, commits and resumes through s3fs (local moto server)."""

from __future__ import annotations

import pytest

from dp2o.driver import run_pipeline
from dp2o.plan import read_stage_table
from dp2o.storage import Storage
from tests.helpers import make_hr_folder, tiny_pipeline_config

pytestmark = [pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server; yields the storage options that reach it. Credentials come from the environment,
    as in production (storage options refuse them); the moto server accepts any."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        opts = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        import s3fs

        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("dp2o-test")
        yield opts
        server.stop()


def test_pipeline_on_s3_then_cached_rerun(tmp_path, s3_server):
    hr_local = make_hr_folder(tmp_path / "hr", n=2)
    # HR photos also come from the bucket
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(hr_local), "dp2o-test/hr", recursive=True)
    cfg = tiny_pipeline_config("s3://dp2o-test/run", "s3://dp2o-test/hr", storage_options=s3_server)
    first = run_pipeline(cfg)
    assert first["degrade"].manifest["rows"] == 4 and first["degrade"].manifest["errors"] == 0
    assert first["train"].url.startswith("s3://dp2o-test/run/train/")
    st = Storage(first["pairs"].url, s3_server)
    assert read_stage_table(st).num_rows > 0
    assert st.exists("_MANIFEST.json")
    assert Storage(first["train"].url, s3_server).listdir("model")

    again = run_pipeline(cfg)
    assert all(r.computed == 0 for r in again.values())
