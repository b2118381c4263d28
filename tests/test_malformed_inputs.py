"""Every malformed config, flag and URL is refused before any work, with a message naming the field or flag and
the fix: one table of cases (YAML files, `--set` values, CLI flags, URLs, and data the pairs stage cannot pair),
each run in-process through `dp2o.cli.main`, asserting the exit code (2 for config errors, 1 for others), the
message, no traceback, and that nothing was written (no stage folder, no stray local folder such as `s3:`).

Work is made impossible rather than merely unexpected: the Prefect flows, the pipeline driver and the stage
driver raise if reached, so a case that is wrongly accepted fails at once instead of running a stage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import dp2o.cli
import dp2o.driver
from dp2o.cli import main

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # yaml | set | flag | url | data
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # fragments that must all be in stderr
    rc: int = 2
    yaml: str | bytes | None = None  # written to {cfg}
    setup: Callable[[Path], None] | None = None


def Y(id: str, text: str | bytes, *expect: str, cmd: tuple[str, ...] = ("run",)) -> Case:
    """A config file (YAML) given with --config."""
    return Case(id, "yaml", (*cmd, "--config", "{cfg}"), expect, yaml=text)


def S(id: str, sets: str | tuple[str, ...], *expect: str) -> Case:
    """`dp2o run` with --set overrides."""
    sets = (sets,) if isinstance(sets, str) else sets
    return Case(id, "set", ("run", *[a for s in sets for a in ("--set", s)]), expect)


def F(id: str, argv: tuple[str, ...], *expect: str, rc: int = 2) -> Case:
    """Command-line flags."""
    return Case(id, "flag", argv, expect, rc=rc)


def U(id: str, argv: tuple[str, ...], *expect: str, rc: int = 2, setup=None) -> Case:
    """A URL or folder location."""
    return Case(id, "url", argv, expect, rc=rc, setup=setup)


def D(id: str, argv: tuple[str, ...], *expect: str, setup, rc: int = 1) -> Case:
    """Data a stage cannot use (refused by its planner, before its output folder exists)."""
    return Case(id, "data", argv, expect, rc=rc, setup=setup)


def _scores(groups: dict[str, int], columns=("sample_id", "candidate", "reward")):
    def write(tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = {"sample_id": [], "candidate": [], "reward": []}
        for sid, m in groups.items():
            rows["sample_id"] += [sid] * m
            rows["candidate"] += list(range(m))
            rows["reward"] += [0.1 * (i + 1) for i in range(m)]
        pq.write_table(pa.table({c: rows[c] for c in columns}), tmp / "scores.parquet")

    return write


def _file(name: str):
    def write(tmp: Path) -> None:
        (tmp / name).write_text("not a folder\n")

    return write


PAIRS = ("pairs", "--scores", "{tmp}/scores.parquet", "--out", "{tmp}/pairs-out", "--orchestrator", "local")
_HAS_GCSFS = importlib.util.find_spec("gcsfs") is not None

CASES: list[Case] = [
    # ---- config files -------------------------------------------------------------------------------------
    Y(
        "yaml-bad-int",
        "sample:\n  num_candidates: many\n",
        "sample.num_candidates",
        "valid integer",
        "c.yaml",
    ),
    Y(
        "yaml-unknown-field",
        "sample:\n  num_candidate: 8\n",
        "sample.num_candidate",
        "did you mean num_candidates",
    ),
    Y("yaml-unknown-section", "samples:\n  num_candidates: 8\n", "samples", "did you mean sample"),
    Y("yaml-unknown-top", "steps: 10\n", "steps", "unknown field", "PipelineConfig has"),
    Y("yaml-list", "- a\n- b\n", "must be a mapping of sections", "got list"),
    Y("yaml-scalar", "just words\n", "must be a mapping of sections", "got str"),
    Y("yaml-syntax", "sample: [unclosed\n", "not valid YAML", "c.yaml"),
    Y(
        "yaml-duplicate-key",
        "sample:\n  num_candidates: 8\n  num_candidates: 16\n",
        "'num_candidates' appears twice",
    ),
    Y("yaml-duplicate-section", "pairs:\n  n_top: 1\npairs:\n  n_top: 2\n", "'pairs' appears twice"),
    Y("yaml-not-utf8", b"\xff\xfe\x00sample: 1\n", "not UTF-8"),
    Y("yaml-section-scalar", "sample: 5\n", "sample", "valid dictionary"),
    Y("yaml-n-top-zero", "pairs:\n  n_top: 0\n", "pairs.n_top", "greater than or equal to 1"),
    Y(
        "yaml-n-top-vs-m",
        "pairs:\n  n_top: 3\nsample:\n  num_candidates: 4\n",
        "pairs.n_top=3",
        "sample.num_candidates=4",
    ),
    Y("yaml-weighting", "pairs:\n  weighting: linear\n", "pairs.weighting", "'hpo' or 'uniform'"),
    Y(
        "yaml-timesteps",
        "train:\n  timestep_range: [0.6, 0.2]\n",
        "train.timestep_range",
        "0 <= lo < hi <= 1",
    ),
    Y("yaml-betas-short", "train:\n  adam_betas: [0.9]\n", "train.adam_betas"),
    Y("yaml-betas-range", "train:\n  adam_betas: [1.5, 0.999]\n", "train.adam_betas", "[0, 1)"),
    Y("yaml-lr-zero", "train:\n  learning_rate: 0\n", "train.learning_rate", "greater than 0"),
    Y("yaml-lr-nan", "train:\n  learning_rate: .nan\n", "train.learning_rate", "finite"),
    Y(
        "yaml-processes",
        "train:\n  num_processes: 64\n  pairs_per_step: 8\n  micro_batch: 8\n",
        "train.num_processes=64",
        "lower train.micro_batch",
    ),
    Y(
        "yaml-metric-unknown",
        "score:\n  metrics: [psnr, bogus]\n",
        "score.metrics",
        "unknown metric(s) 'bogus'",
    ),
    Y("yaml-metrics-empty", "score:\n  metrics: []\n", "score.metrics", "no metrics given"),
    Y("yaml-metrics-twice", "score:\n  metrics: [psnr, psnr]\n", "score.metrics", "listed more than once"),
    Y("yaml-eval-preset", "evaluate:\n  metrics: offlne\n", "evaluate.metrics", "did you mean 'offline'"),
    Y(
        "yaml-weight-unscored",
        "score:\n  reward:\n    metric_weights: {lpips: 2}\n",
        "score: reward.metric_weights",
        "'lpips'",
        "add it to the section's metrics",
    ),
    Y(
        "yaml-weight-unknown",
        "score:\n  reward:\n    metric_weights: {psnrr: 2}\n",
        "score.reward.metric_weights",
        "did you mean 'psnr'",
    ),
    Y(
        "yaml-weight-negative",
        "score:\n  reward:\n    metric_weights: {psnr: -1}\n",
        "metric_weights",
        ">= 0",
    ),
    Y(
        "yaml-percentiles",
        "score:\n  reward:\n    clip_percentiles: [99, 1]\n",
        "score.reward.clip_percentiles",
        "0 <= low < high <= 100",
    ),
    Y("yaml-fr-weight", "score:\n  reward:\n    fr_weight: 1.5\n", "score.reward.fr_weight"),
    Y("yaml-normalization", "score:\n  reward:\n    normalization: global\n", "score.reward.normalization"),
    Y("yaml-crop-multiple", "degrade:\n  crop_size: 130\n", "crop_size=130", "multiple of degradation.scale"),
    Y("yaml-crop-small", "degrade:\n  crop_size: 64\n", "crop_size=64", "too small"),
    Y("yaml-min-size", "degrade:\n  min_size: 32\n", "degrade.min_size=32", "at least 512"),
    Y("yaml-bundled", "degrade:\n  input: bundled://nope\n", "degrade.input", "bundled://train"),
    Y("yaml-backend-kind", "sample:\n  backend:\n    kind: sd3\n", "sample.backend.kind", "'tiny'"),
    Y(
        "yaml-backend-device",
        "sample:\n  backend:\n    device: gpu\n",
        "sample.backend.device",
        "did you mean cuda",
    ),
    Y("yaml-confidence", "evaluate:\n  confidence: 1.0\n", "evaluate.confidence", "less than 1"),
    Y("yaml-root-url", "root: 's3:/bucket/run'\n", "root", "write s3://bucket/run"),
    Y("yaml-secret", "storage_options:\n  secret: abc\n", "storage_options", "AWS_SECRET_ACCESS_KEY"),
    Y(
        "yaml-nested-secret",
        "storage_options:\n  client_kwargs:\n    aws_access_key_id: abc\n",
        "client_kwargs.aws_access_key_id",
        "AWS_ACCESS_KEY_ID",
    ),
    Y("yaml-ray-address", "ray:\n  address: 'http://head:8265'\n", "ray.address", "ray://HOST:10001"),
    Y("yaml-executor", "executor: dask\n", "executor", "'local' or 'ray'"),
    Y("yaml-workers", "workers: 0\n", "workers", "greater than or equal to 1"),
    Y(
        "yaml-stage-cmd",
        "degrade:\n  crop_size: 0\n",
        "degrade.crop_size",
        cmd=("degrade", "--out", "{tmp}/o"),
    ),
    # ---- --set values -------------------------------------------------------------------------------------
    S("set-zero", "sample.num_candidates=0", "sample.num_candidates", "greater than or equal to 2"),
    S("set-no-equals", "nonsense", "--set 'nonsense'", "expected KEY=VALUE"),
    S("set-empty-key", "=5", "--set", "empty name"),
    S("set-empty-part", "sample..seed=1", "--set", "empty name"),
    S("set-bad-yaml", "sample.num_candidates=[1", "--set sample.num_candidates", "not valid YAML"),
    S("set-scalar-then-key", ("sample=3", "sample.seed=1"), "'sample' is not a section"),
    S("set-key-then-scalar", ("sample.seed=1", "sample=3"), "both as a section and as a value"),
    S("set-metric", "score.metrics=bogus", "score.metrics", "unknown metric(s) 'bogus'"),
    S("set-preset-case", "score.metrics=Paper", "score.metrics", "did you mean 'paper'"),
    S("set-pyiqa-name", "score.metrics=clipiqa+", "did you mean 'clipiqa_plus'"),
    S("set-eval-metric", "evaluate.metrics=[psnr, lpipz]", "evaluate.metrics", "did you mean 'lpips'"),
    S(
        "set-weight-unscored",
        "score.reward.metric_weights={lpips: 1}",
        "score: reward.metric_weights",
        "'lpips'",
    ),
    S(
        "set-weights-zero",
        "score.reward.metric_weights={psnr: 0, ssim: 0, fsim: 0, gmsd: 0}",
        "FR metrics",
        "total weight of 0",
    ),
    S("set-weight-inf", "score.reward.metric_weights={psnr: .inf}", "metric_weights", "finite"),
    S("set-bool-int", "sample.num_candidates=true", "sample.num_candidates", "expected a number"),
    S("set-bool-top", "workers=yes", "workers", "expected a number"),
    S("set-float-int", "train.steps=1.5", "train.steps", "integer"),
    S("set-empty-int", "train.steps=", "train.steps", "valid integer"),
    S("set-empty-root", "root=", "root", "valid string"),
    S("set-device", "degrade.device=cuda0", "degrade.device", "not a device"),
    S("set-device-gpu", "score.device=GPU", "score.device", "did you mean cuda"),
    S("set-secret-key", "storage_options.key=abc", "storage_options", "AWS_ACCESS_KEY_ID"),
    S("set-secret-password", "storage_options.password=abc", "storage_options.password", "environment"),
    S("set-input-scheme", "degrade.input=foo://x/y", "degrade.input", "unknown URL scheme 'foo://'"),
    S("set-input-slash", "degrade.input=s3:/bucket/hr", "degrade.input", "write s3://bucket/hr"),
    S("set-steps-backend", "sample.backend.num_inference_steps=0", "sample.backend.num_inference_steps"),
    S("set-warmup", "train.warmup_steps=-1", "train.warmup_steps"),
    S("set-eval-m", "evaluate.num_candidates=0", "evaluate.num_candidates"),
    S("set-retries", "ray.max_retries=-1", "ray.max_retries"),
    S("set-degradation-nan", "degrade.degradation.first.noise_range=[1, .nan]", "noise_range[1]", "finite"),
    S("set-grad-norm", "train.max_grad_norm=-1", "train.max_grad_norm"),
    S("set-shard-index", "shard_index=-1", "shard_index"),
    # ---- flags --------------------------------------------------------------------------------------------
    F(
        "flag-crop-zero",
        ("degrade", "--out", "{tmp}/o", "--crop-size", "0"),
        "degrade.crop_size",
        "--crop-size",
    ),
    F("flag-crop-negative", ("degrade", "--out", "{tmp}/o", "--crop-size", "-16"), "degrade.crop_size"),
    F("flag-crop-multiple", ("degrade", "--out", "{tmp}/o", "--crop-size", "130"), "multiple", "--crop-size"),
    F("flag-crop-text", ("degrade", "--out", "{tmp}/o", "--crop-size", "abc"), "--crop-size", "invalid int"),
    F(
        "flag-m-zero",
        ("sample", "--input", "{tmp}/d", "--out", "{tmp}/o", "--num-candidates", "0"),
        "sample.num_candidates",
        "--num-candidates",
    ),
    F(
        "flag-m-one",
        ("sample", "--input", "{tmp}/d", "--out", "{tmp}/o", "--num-candidates", "1"),
        "--num-candidates",
    ),
    F(
        "flag-steps-zero",
        ("train", "--pairs", "{tmp}/p", "--samples", "{tmp}/s", "--out", "{tmp}/o", "--steps", "0"),
        "train.steps",
        "--steps",
    ),
    F(
        "flag-steps-negative",
        ("train", "--pairs", "p", "--samples", "s", "--out", "o", "--steps", "-5"),
        "--steps",
    ),
    F("flag-n-top-zero", (*PAIRS, "--n-top", "0"), "pairs.n_top", "--n-top"),
    F("flag-weighting", (*PAIRS, "--weighting", "linear"), "--weighting", "invalid choice"),
    F(
        "flag-metrics",
        ("score", "--input", "i", "--out", "o", "--metrics", "bogus"),
        "score.metrics",
        "--metrics",
    ),
    F(
        "flag-metrics-list",
        ("score", "--input", "i", "--out", "o", "--metrics", "psnr,ssimm"),
        "did you mean 'ssim'",
    ),
    F(
        "flag-eval-metrics",
        ("evaluate", "--heldout", "h", "--out", "o", "--metrics", "paperr"),
        "evaluate.metrics",
        "did you mean 'paper'",
    ),
    F("flag-partition", ("run", "--shard-index", "2", "--num-shards", "2"), "shard_index=2", "--shard-index"),
    F("flag-num-shards", ("run", "--num-shards", "0"), "num_shards", "--num-shards"),
    F("flag-shard-negative", ("run", "--shard-index", "-1"), "shard_index", "--shard-index"),
    F("flag-executor", ("run", "--executor", "dask"), "--executor", "invalid choice"),
    F("flag-orchestrator", ("run", "--orchestrator", "airflow"), "--orchestrator", "invalid choice"),
    F("flag-until", ("run", "--until", "deploy"), "--until", "invalid choice"),
    F("flag-ray-address", ("run", "--ray-address", "bogus"), "ray.address", "--ray-address"),
    F("flag-ray-empty", ("run", "--ray-address", "ray://"), "ray.address", "--ray-address"),
    F(
        "flag-so-no-equals",
        ("run", "--storage-option", "nonsense"),
        "--storage-option 'nonsense'",
        "KEY=VALUE",
    ),
    F("flag-so-key", ("run", "--storage-option", "key=abc"), "--storage-option", "AWS_ACCESS_KEY_ID"),
    F("flag-so-secret", ("run", "--storage-option", "secret=abc"), "AWS_SECRET_ACCESS_KEY"),
    F("flag-so-token", ("run", "--storage-option", "token=abc"), "AWS_SESSION_TOKEN"),
    F(
        "flag-so-nested-token",
        ("run", "--storage-option", "client_kwargs.aws_session_token=x"),
        "client_kwargs.aws_session_token",
        "AWS_SESSION_TOKEN",
    ),
    F(
        "flag-so-sse-key",
        ("run", "--storage-option", "s3_additional_kwargs.SSECustomerKey=x"),
        "s3_additional_kwargs.SSECustomerKey",
    ),
    F(
        "flag-so-endpoint",
        ("run", "--storage-option", "endpoint_url=localhost:9000"),
        "endpoint_url",
        "http://",
    ),
    F(
        "flag-so-nested-endpoint",
        ("run", "--storage-option", "client_kwargs.endpoint_url=ftp://x"),
        "--storage-option client_kwargs.endpoint_url",
    ),
    F("flag-so-port", ("run", "--storage-option", "endpoint_url=http://host:port"), "malformed port"),
    F("flag-missing-out", ("pairs", "--scores", "x"), "--out", "required"),
    F("flag-command", ("deploy",), "invalid choice"),
    F("flag-prefetch", ("prefetch-metrics", "bogus"), "prefetch-metrics", "unknown metric(s) 'bogus'"),
    # ---- URLs and folders ----------------------------------------------------------------------------------
    U("url-missing-slash", ("run", "--root", "s3:/missing-slash"), "--root", "write s3://missing-slash"),
    U("url-unknown", ("run", "--root", "foo://bar/baz"), "--root", "unknown URL scheme 'foo://'"),
    U("url-case", ("run", "--root", "S3://b/x"), "--root", "did you mean 's3://'"),
    U("url-typo", ("run", "--root", "s4://b/x"), "--root", "did you mean 's3://'"),
    U("url-no-bucket", ("run", "--root", "s3://"), "--root", "names no bucket"),
    U("url-empty-bucket", ("run", "--root", "s3:///x"), "--root", "empty bucket name"),
    U("url-empty", ("run", "--root", ""), "--root", "must not be empty"),
    U("url-space", ("run", "--root", " runs/x"), "--root", "whitespace"),
    U("url-read-only", ("run", "--root", "http://example.com/run"), "--root", "read-only"),
    U(
        "url-not-installed",
        ("run", "--root", "gcs://b/x" if not _HAS_GCSFS else "abfs://c/x"),
        "--root",
        "not installed",
    ),
    U("url-file-colon", ("run", "--root", "file:/x"), "--root", "file:///x"),
    U("url-chain", ("run", "--root", "simplecache::foo://x"), "--root", "unknown URL scheme"),
    U("url-memory-empty", ("run", "--root", "memory://"), "--root", "names no bucket or path"),
    U("url-root-file", ("run", "--root", "{tmp}/afile"), "--root", "is a file", setup=_file("afile")),
    U(
        "url-root-in-file",
        ("run", "--root", "{tmp}/afile/sub"),
        "--root",
        "which is a file",
        setup=_file("afile"),
    ),
    U("url-input", ("sample", "--input", "s3:/b/x", "--out", "{tmp}/o"), "--input", "write s3://b/x"),
    U("url-input-scheme", ("sample", "--input", "foo://x/y", "--out", "{tmp}/o"), "--input", "unknown URL"),
    U("url-scores", ("pairs", "--scores", "s3:b/x", "--out", "{tmp}/o"), "--scores", "malformed URL"),
    U("url-out-scheme", ("score", "--input", "{tmp}/x", "--out", "gcs3://b/o"), "--out", "did you mean"),
    U("url-out-slash", ("degrade", "--out", "s3:/b/o"), "--out", "write s3://b/o"),
    U("url-out-http", ("degrade", "--out", "https://h/o"), "--out", "read-only"),
    U("url-out-file", ("degrade", "--out", "{tmp}/afile"), "--out", "is a file", setup=_file("afile")),
    U(
        "url-bundled",
        ("degrade", "--input", "bundled://nope", "--out", "{tmp}/o"),
        "--input",
        "bundled://train",
    ),
    U(
        "url-then-out",
        ("score", "--input", "{tmp}/x", "--out", "{tmp}/o", "--reward-out", "s3:/x"),
        "--reward-out",
    ),
    U("url-inspect", ("inspect", "foo://x/y"), "unknown URL scheme 'foo://'"),
    U(
        "url-unreachable",
        ("run", "--root", "s3://bucket/run", "--storage-option", "endpoint_url=http://127.0.0.1:9"),
        "--root",
        "cannot reach 's3://bucket/run'",
        "127.0.0.1:9",
        rc=1,
    ),
    # ---- data the stage cannot use --------------------------------------------------------------------------
    D(
        "data-pairs-m",
        (*PAIRS, "--n-top", "3"),
        "pairs.n_top=3",
        "M=4",
        "at most 2",
        setup=_scores({"a": 4, "b": 4, "c": 4}),
    ),
    D("data-pairs-m-range", (*PAIRS, "--n-top", "2"), "M from 2 to 3", setup=_scores({"a": 2, "b": 3})),
    D(
        "data-pairs-columns",
        PAIRS,
        "missing column(s) ['reward']",
        setup=_scores({"a": 4}, columns=("sample_id", "candidate")),
    ),
]


class _WorkStarted(AssertionError):
    pass


def _no_work(*args, **kwargs):
    raise _WorkStarted("a stage was about to run: the malformed input was accepted")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """cwd = an empty folder (relative roots land there); credentials in the environment (the unreachable
    endpoint must fail on the connection, not on missing credentials); every way to start work disabled."""
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dp2o.cli, "_flows", _no_work)
    monkeypatch.setattr(dp2o.driver, "run_pipeline", _no_work)
    monkeypatch.setattr(dp2o.driver, "run_stage", _no_work)
    return work


def _listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_refused_before_any_work(case: Case, sandbox: Path, capsys):
    if case.setup is not None:
        case.setup(sandbox)
    if case.yaml is not None:
        cfg = sandbox / "c.yaml"
        cfg.write_bytes(case.yaml if isinstance(case.yaml, bytes) else case.yaml.encode())
    before = _listing(sandbox)
    argv = [a.replace("{cfg}", str(sandbox / "c.yaml")).replace("{tmp}", str(sandbox)) for a in case.argv]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == case.rc, err
    assert "Traceback" not in err
    for fragment in case.expect:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert _listing(sandbox) == before, "something was written"


def test_the_table_covers_every_kind():
    kinds = Counter(c.kind for c in CASES)
    assert len(CASES) >= 80 and set(kinds) == {"yaml", "set", "flag", "url", "data"}, kinds
    assert len({c.id for c in CASES}) == len(CASES)


#: modules a config error must not wait for (seconds of imports each)
HEAVY = ("torch", "diffusers", "transformers", "pyiqa", "prefect", "ray")

_PROBE = f"""
import json, sys
from dp2o.cli import main
rc = main(sys.argv[1:])
print(json.dumps({{"rc": rc, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--set", "sample.num_candidates=0"],
        ["run", "--set", "score.metrics=bogus"],
        ["run", "--root", "s3:/missing-slash"],
        ["sample", "--input", "x", "--out", "y", "--num-candidates", "0"],
        ["train", "--pairs", "p", "--samples", "s", "--out", "o", "--storage-option", "secret=x"],
    ],
    ids=["set", "metric", "url", "stage-flag", "secret"],
)
def test_config_errors_come_before_heavy_imports(argv, tmp_path):
    """The CLI validates before importing torch, diffusers, pyiqa or Prefect (a timing assertion would be
    fragile on a loaded machine; what makes the error fast is that none of these is imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"rc": 2, "loaded": []}, r.stderr
    assert "dp2o:" in r.stderr and not list(tmp_path.iterdir())
