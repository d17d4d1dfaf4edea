"""kubetune.storage where no server is needed: an S3 endpoint nobody listens on fails fast, an
unwritable local folder is named, and download_uri copies local paths. (Against a real S3 API:
tests/integration/test_storage.py.)"""

from __future__ import annotations

import re
import time

import pytest

from kubetune.errors import ConfigError, DataError, ServiceError
from kubetune.storage import download_uri, open_store
from tiny import make_tree


def test_check_fails_fast_on_an_unreachable_endpoint(free_port):
    endpoint = f"http://127.0.0.1:{free_port}"  # nothing listens there
    store = open_store("s3://bucket/x", endpoint_url=endpoint)
    start = time.monotonic()
    with pytest.raises(ServiceError) as info:
        store.check()
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "storage.uri = 's3://bucket/x'" in message and endpoint in message and "cannot reach" in message


def test_operations_fail_fast_on_an_unreachable_endpoint(free_port):
    """The store's own client retries a little (3 attempts with backoff), not for minutes."""
    store = open_store("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{free_port}")
    start = time.monotonic()
    with pytest.raises(ServiceError, match="cannot reach"):
        store.write_bytes("k", b"1")
    assert time.monotonic() - start < 10


def test_check_reports_an_unwritable_local_folder(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    uri = str(tmp_path / "a-file" / "store")  # root runs the tests, so chmod would not stop it
    with pytest.raises(ServiceError, match="not writable") as info:
        open_store(uri).check()
    assert str(info.value).startswith(f"storage.uri = {uri!r}")


def test_download_uri_from_a_local_path(tmp_path):
    files = make_tree(tmp_path / "src")
    path = download_uri(str(tmp_path / "src" / "adapter_config.json"), tmp_path / "one")
    assert path.read_bytes() == files["adapter_config.json"]
    assert download_uri((tmp_path / "src").as_uri(), tmp_path / "all") == tmp_path / "all"
    assert (tmp_path / "all" / "weights" / "deep" / "x.txt").read_bytes() == b"x"
    with pytest.raises(DataError):
        download_uri(str(tmp_path / "missing"), tmp_path / "none")


@pytest.mark.parametrize("uri", ["file:///", "/", "/..", "file:///tmp/.."])
def test_a_store_at_the_filesystem_root_is_refused(uri, tmp_path):
    with pytest.raises(ConfigError, match=rf"^storage.uri = {re.escape(repr(uri))}: this is the filesystem root"):
        open_store(uri)
    assert open_store(f"file://{tmp_path}/runs").uri().endswith("/runs")
    with pytest.raises(ConfigError, match="^evaluate.x = "):  # errors name the key the URI came from
        open_store(uri, field="evaluate.x")
