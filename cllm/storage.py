"""Where shards and models live: a local path or any fsspec URI (`s3://` on AWS or an
S3-compatible store such as MinIO or moto)."""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec

STAGING_DIR = "_staging"  # under an output: writers stage files here; readers skip `_`-prefixed directories


class StorageError(OSError):
    """An output location that cannot be written (missing bucket, unreachable store, ...)."""


def storage_options(s3_endpoint: str | None = None) -> dict[str, Any]:
    """fsspec options for an S3-compatible endpoint (MinIO, moto, ...); empty for AWS or local.
    Short connect timeouts and few retries, so an unreachable endpoint fails in seconds."""
    if not s3_endpoint:
        return {}
    return {
        "client_kwargs": {"endpoint_url": s3_endpoint},
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2}},
    }


def resolve(path_or_uri: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as `s3://bucket/prefix`."""
    filesystem, path = fsspec.core.url_to_fs(path_or_uri, **(options or {}))
    return filesystem, path


def check_writable(path_or_uri: str, options: dict[str, Any] | None = None) -> None:
    """Raise StorageError unless a file can be created under `path_or_uri`: a missing bucket and
    an unreachable store are told apart in the message."""
    filesystem, path = resolve(path_or_uri, options)
    probe = f"{path.rstrip('/')}/{STAGING_DIR}/probe-{uuid.uuid4().hex}"
    try:
        if "s3" in filesystem.protocol:
            bucket = path.split("/", 1)[0]
            try:
                filesystem.ls(bucket)  # unlike exists(), this tells a missing bucket from no connection
            except FileNotFoundError:
                raise StorageError(f"output bucket {bucket!r} does not exist (output {path_or_uri})") from None
        filesystem.makedirs(posixpath.dirname(probe), exist_ok=True)
        filesystem.pipe(probe, b"")
        filesystem.rm(probe)
    except StorageError:
        raise
    except Exception as error:  # botocore and OS errors differ by store; all mean "cannot write"
        raise StorageError(f"cannot write to output {path_or_uri}: {type(error).__name__}: {error}") from error


def display_path(filesystem: fsspec.AbstractFileSystem, path: str) -> str:
    return filesystem.unstrip_protocol(path) if "file" not in protocols(filesystem) else path


def protocols(filesystem: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = filesystem.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
