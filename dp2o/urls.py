"""Checks of run-root, stage-folder and input URLs before anything is read or written.

fsspec treats any string without `://` as a local path, so a typo such as `s3:/bucket` silently writes a
local folder named `s3:`, and an unknown scheme fails deep inside a stage with `Protocol not known`. Every
URL the pipeline is given (config `root`, `degrade.input`, the CLI's `--root`, `--out` and input flags, and
every `Storage`) passes `url_problem` first; a problem is reported with the field or flag and the fix.

Only fsspec's registry is consulted (plain data): no filesystem implementation is imported here.
"""

from __future__ import annotations

import difflib
import importlib.util
import re

from dp2o.errors import Dp2oError

#: a scheme-like prefix `name:` (RFC 3986 scheme characters); one letter is a Windows drive, not a scheme
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
#: filesystems fsspec can read but not write: never a run root or a stage folder
READ_ONLY = frozenset({"http", "https", "github", "git", "zip", "tar", "libarchive", "reference", "data"})


class URLError(Dp2oError, ValueError):
    """A URL is malformed or names a filesystem that is not available; the message says how to fix it."""


def known_protocols() -> list[str]:
    """Every protocol fsspec knows (registered or importable on demand)."""
    from fsspec.registry import known_implementations, registry

    return sorted({*known_implementations, *registry})


def _missing_implementation(protocol: str) -> str | None:
    """The install hint when `protocol` is known to fsspec but its package is not installed (None if usable)."""
    from fsspec.registry import known_implementations, registry

    if protocol in registry:
        return None
    impl = known_implementations.get(protocol)
    if impl is None:
        return None
    module = impl["class"].split(".", 1)[0]
    if importlib.util.find_spec(module) is not None:
        return None
    return impl.get("err") or f"install the package providing {impl['class']}"


def _unknown_protocol(protocol: str, extra: tuple[str, ...]) -> str:
    choices = [*known_protocols(), *extra]
    close = difflib.get_close_matches(protocol.lower(), choices, n=3, cutoff=0.5)
    if protocol.lower() in choices:
        close = [protocol.lower()]
    hint = f" (did you mean {' or '.join(repr(c + '://') for c in close)}?)" if close else ""
    return (
        f"unknown URL scheme {protocol + '://'!r}{hint}; use a local folder or a scheme fsspec knows "
        "(s3://, gs://, memory://, file://, ...)"
    )


def url_problem(url: object, *, output: bool = False, extra_schemes: tuple[str, ...] = ()) -> str | None:
    """What is wrong with `url` as a location (None: nothing).

    output:        the URL will be written to (a run root or stage folder): read-only filesystems are refused
    extra_schemes: schemes the caller handles itself besides fsspec's (e.g. "bundled" for degrade.input)
    """
    if not isinstance(url, str):
        return f"expected a folder path or URL string, got {type(url).__name__}"
    if not url.strip():
        return "must not be empty; give a local folder or a URL such as s3://bucket/prefix"
    if url != url.strip():
        return f"{url!r} starts or ends with whitespace; remove it"
    if "\x00" in url or "\n" in url:
        return f"{url!r} contains a control character"
    parts = url.split("::")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if "://" in part:
            protocol, rest = part.split("://", 1)
            if not _SCHEME.match(protocol + ":") or len(protocol) < 2:
                return f"{url!r} has a malformed scheme {protocol!r}; write e.g. s3://bucket/prefix"
            if protocol in extra_schemes:
                if not rest.strip("/"):
                    return f"{url!r} names nothing after {protocol}://"
                continue
            if protocol not in known_protocols():
                return f"{url!r}: " + _unknown_protocol(protocol, extra_schemes)
            missing = _missing_implementation(protocol)
            if missing:
                return f"{url!r} needs the {protocol}:// filesystem, which is not installed: {missing}"
            if last and not rest.strip("/"):
                return f"{url!r} names no bucket or path after {protocol}://; write e.g. {protocol}://bucket/prefix"
            if last and protocol in ("s3", "s3a", "gs", "gcs") and rest.startswith("/"):
                return f"{url!r} has an empty bucket name; write {protocol}://bucket/prefix"
            if last and output and protocol in READ_ONLY:
                return f"{url!r}: the {protocol}:// filesystem is read-only; write to a local folder or s3://"
        elif not last:
            # a chained protocol without its own path (`simplecache::s3://...`)
            if part not in known_protocols():
                return f"{url!r}: " + _unknown_protocol(part, extra_schemes)
        else:
            m = _SCHEME.match(part)
            if m and len(m.group(1)) > 1:
                scheme = m.group(1)
                known = scheme.lower() in {*known_protocols(), *extra_schemes}
                rest = part[len(scheme) + 1 :]
                rest = (
                    rest if scheme.lower() in ("file", "local") and rest.startswith("/") else rest.lstrip("/")
                )
                fix = (
                    f"write {scheme.lower()}://{rest} (a scheme needs '://')"
                    if known
                    else "a URL scheme needs '://' (e.g. s3://bucket/prefix)"
                )
                return f"{url!r} looks like a malformed URL: {fix}; for a local folder whose name has a ':' write ./{part}"
    return None


def check_url(url: object, what: str, *, output: bool = False, extra_schemes: tuple[str, ...] = ()) -> None:
    """Raise URLError naming `what` (a flag or config field) if `url` is not a usable location."""
    problem = url_problem(url, output=output, extra_schemes=extra_schemes)
    if problem:
        raise URLError(f"{what}: {problem}")
