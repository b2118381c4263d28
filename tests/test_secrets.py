"""No plaintext secret reaches Prefect: storage credentials come from the environment (or ~/.aws), never from
storage options, so neither a flow's parameters nor a task's, its logs or the stage outputs can hold them.

The end-to-end check runs the pipeline up to pairs on a moto S3 server under a Prefect test server, with
distinctive credentials in the environment only, then searches the Prefect database (and everything else
under PREFECT_HOME), the captured logs and every output object for them.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dp2o.config import ConfigError, PipelineConfig, load_config, secret_storage_options
from tests.helpers import make_hr_folder, tiny_pipeline_config


@pytest.mark.parametrize(
    "options, names",
    [
        ({"key": "x", "secret": "y", "token": "z"}, ["key", "secret", "token"]),
        (
            {"aws_access_key_id": "x", "aws_secret_access_key": "y"},
            ["aws_access_key_id", "aws_secret_access_key"],
        ),
        (
            {"client_kwargs": {"aws_session_token": "x", "endpoint_url": "http://h:9000"}},
            ["client_kwargs.aws_session_token"],
        ),
        ({"config_kwargs": {"s3": {"password": "x"}}}, ["config_kwargs.s3.password"]),
        ({"s3_additional_kwargs": {"SSECustomerKey": "x"}}, ["s3_additional_kwargs.SSECustomerKey"]),
        (
            {"Secret-Access-Key": "x", "api_key": "y", "account_key": "z"},
            ["Secret-Access-Key", "api_key", "account_key"],
        ),
    ],
)
def test_credential_like_storage_options_are_found_even_nested(options, names):
    assert [n for n, _ in secret_storage_options(options)] == names


def test_non_secret_storage_options_stay_allowed():
    options = {
        "endpoint_url": "http://localhost:9000",
        "anon": False,
        "client_kwargs": {"endpoint_url": "https://s3.example.com", "region_name": "eu-west-1"},
        "config_kwargs": {"signature_version": "s3v4", "retries": {"max_attempts": 3}},
        "requester_pays": False,
        "profile": "ci",
        "region": "eu-west-1",
        "use_ssl": True,
    }
    assert secret_storage_options(options) == []
    cfg = load_config(PipelineConfig, None, {"storage_options": options})
    assert cfg.storage_options == options


def test_a_secret_in_storage_options_is_refused_without_echoing_it():
    value = f"dp2o-secret-{uuid.uuid4().hex}"
    with pytest.raises(ConfigError) as e:
        load_config(
            PipelineConfig, None, {"storage_options": {"client_kwargs": {"aws_secret_access_key": value}}}
        )
    assert "AWS_SECRET_ACCESS_KEY" in str(e.value) and value not in str(e.value)


def test_cli_refuses_a_secret_storage_option_and_never_prints_it(capsys, tmp_path, monkeypatch):
    from dp2o.cli import main

    monkeypatch.chdir(tmp_path)
    value = f"dp2o-secret-{uuid.uuid4().hex}"
    rc = main(["run", "--root", "s3://b/run", "--storage-option", f"secret={value}"])
    out = capsys.readouterr()
    assert rc == 2 and "AWS_SECRET_ACCESS_KEY" in out.err
    assert value not in out.err + out.out and not list(tmp_path.iterdir())


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server with distinctive credentials in the environment; yields (storage options, secrets)."""
    from moto.server import ThreadedMotoServer

    secrets = {
        "AWS_ACCESS_KEY_ID": f"AKIADP2O{uuid.uuid4().hex[:12].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"dp2o-secret-{uuid.uuid4().hex}",
        "AWS_SESSION_TOKEN": f"dp2o-token-{uuid.uuid4().hex}",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}  # not a secret: allowed
    try:
        yield opts, secrets
    finally:
        server.stop()


def _files_holding(folder: Path, needles: list[bytes]) -> dict[str, list[str]]:
    found = {}
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits = [n.decode() for n in needles if n in data]
            if hits:
                found[str(p)] = hits
    return found


@pytest.mark.slow
@pytest.mark.s3
def test_no_secret_reaches_prefect_logs_or_outputs(tmp_path, moto_s3, prefect_harness, capfd, caplog):
    import logging

    import s3fs
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

    import flows

    opts, secrets = moto_s3
    bucket = f"dp2o-secrets-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    fs.mkdir(bucket)
    fs.put(str(make_hr_folder(tmp_path / "hr", n=2)), f"{bucket}/hr", recursive=True)
    root = f"s3://{bucket}/run"
    cfg = tiny_pipeline_config(root, f"s3://{bucket}/hr", storage_options=opts)

    # INFO, what a run logs (botocore's own DEBUG lines show signed request headers: a user's choice, not ours)
    caplog.set_level(logging.INFO)
    text = flows.pipeline(config=cfg, until="pairs")["summary"]
    assert "pairs:" in text  # the run read and wrote the bucket with the environment's credentials
    APILogHandler().flush()  # the flow and task logs are in the database before it is read

    needles = [v.encode() for v in secrets.values()]
    # the Prefect database (and its WAL), and everything under PREFECT_HOME
    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    assert db.exists()
    assert root.encode() in b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*")), (
        "the flow's parameters are not in this database: the search below would prove nothing"
    )
    assert _files_holding(db.parent, needles) == {}
    assert _files_holding(Path(PREFECT_HOME.value()), needles) == {}
    # the captured logs (terminal and Python logging)
    captured = capfd.readouterr()
    logs = captured.out + captured.err + caplog.text
    assert logs and not [s for s in secrets.values() if s in logs]
    # every object the run wrote
    objects = [p for p in fs.find(f"{bucket}/run")]
    assert any(p.endswith("_MANIFEST.json") for p in objects)
    leaked = {p: [n for n in needles if n in fs.cat_file(p)] for p in objects}
    assert {p: n for p, n in leaked.items() if n} == {}
