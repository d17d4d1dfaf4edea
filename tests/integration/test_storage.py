"""kubetune.storage against a real S3 API (moto's server on loopback) and a local folder. (What needs
no server: tests/unit/test_storage_without_server.py.)"""

from __future__ import annotations

import pytest

from kubetune import paths
from kubetune.errors import ConfigError, DataError, ServiceError
from kubetune.storage import LocalStore, S3Store, download_uri, open_store
from tiny import make_tree


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    endpoint_url = request.getfixturevalue("s3_server").endpoint_url
    return open_store(f"s3://{bucket}/runs/7", endpoint_url=endpoint_url)


def test_open_store_picks_the_backend(tmp_path, s3_server):
    s3 = open_store("s3://bucket/some/prefix/", endpoint_url=s3_server.endpoint_url)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri() == "s3://bucket/some/prefix"
    assert s3.uri("ckpt/a.bin") == "s3://bucket/some/prefix/ckpt/a.bin"
    assert open_store("s3://bucket").uri("k") == "s3://bucket/k"

    local = open_store(str(tmp_path / "d"))
    assert isinstance(local, LocalStore) and local.uri("a/b") == str(tmp_path / "d" / "a" / "b")
    assert open_store((tmp_path / "d").as_uri()).root == tmp_path / "d"
    assert open_store(None).root == paths.state_dir() / "storage"

    with pytest.raises(ConfigError, match="storage.uri"):
        open_store("gs://bucket/x")
    with pytest.raises(ConfigError, match="storage.uri"):
        open_store("s3:///no-bucket")


def test_round_trip(store, tmp_path):
    store.check()
    store.write_bytes("notes/hello.txt", b"hello")
    assert store.read_bytes("notes/hello.txt") == b"hello"
    assert store.exists("notes/hello.txt")
    assert not store.exists("notes")  # a folder is not a file
    assert not store.exists("notes/missing.txt")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("notes/missing.txt")

    files = make_tree(tmp_path / "adapter")
    assert store.upload_dir(tmp_path / "adapter", "ckpt/step-10") == 3
    store.upload_file(tmp_path / "adapter" / "adapter_config.json", "ckpt2/config.json")
    expected = sorted(f"ckpt/step-10/{rel}" for rel in files)
    assert store.list("ckpt") == expected  # a folder prefix: ckpt2/ is not under ckpt
    assert store.list("ckpt/step-10/") == expected
    assert store.list() == sorted(expected + ["ckpt2/config.json", "notes/hello.txt"])
    assert store.list("nothing-here") == []

    assert store.download_dir("ckpt/step-10", tmp_path / "back") == 3
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data

    assert store.delete_prefix("ckpt") == 3
    assert store.list() == ["ckpt2/config.json", "notes/hello.txt"]


def test_s3_objects_are_where_a_plain_client_expects_them(s3_server, s3_bucket, tmp_path):
    files = make_tree(tmp_path / "model")
    store = open_store(f"s3://{s3_bucket}/runs/abc", endpoint_url=s3_server.endpoint_url)
    store.upload_dir(tmp_path / "model", "adapter")
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(obj["Key"] for obj in listed) == sorted(f"runs/abc/adapter/{rel}" for rel in files)
    body = client.get_object(Bucket=s3_bucket, Key="runs/abc/adapter/weights/part-0.bin")["Body"].read()
    assert body == files["weights/part-0.bin"]

    client.put_object(Bucket=s3_bucket, Key="runs/abc/from-outside.txt", Body=b"hi")
    client.put_object(Bucket=s3_bucket, Key="runs/abc/folder-marker/", Body=b"")  # as consoles create
    assert store.read_bytes("from-outside.txt") == b"hi"
    assert "from-outside.txt" in store.list()
    assert not any(key.endswith("/") for key in store.list())


def test_endpoint_from_the_environment(s3_server, s3_bucket, monkeypatch):
    """boto3 >= 1.28 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself."""
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        with monkeypatch.context() as mp:
            mp.setenv(variable, s3_server.endpoint_url)
            store = open_store(f"s3://{s3_bucket}")
            assert store.endpoint_url == s3_server.endpoint_url
            store.check()
            store.write_bytes(variable, b"1")
    assert sorted(open_store(f"s3://{s3_bucket}", s3_server.endpoint_url).list()) == [
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]


def test_check_reports_a_missing_bucket(s3_server):
    uri = "s3://no-such-bucket-kubetune/prefix"
    store = open_store(uri, endpoint_url=s3_server.endpoint_url)
    with pytest.raises(ServiceError) as info:
        store.check()
    message = str(info.value)
    assert message.startswith(f"storage.uri = {uri!r}")
    assert "does not exist" in message and "no-such-bucket-kubetune" in message


def test_check_reports_missing_credentials(s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # else boto3 asks the instance metadata service
    store = open_store(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(ServiceError, match="AWS_ACCESS_KEY_ID") as info:
        store.check()
    assert str(info.value).startswith(f"storage.uri = 's3://{s3_bucket}'")


def test_download_uri_from_s3(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="data/quotes.jsonl", Body=b'{"content": "a"}\n')
    client.put_object(Bucket=s3_bucket, Key="models/tiny/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="models/tiny/tokenizer/vocab.txt", Body=b"a\nb\n")
    client.put_object(Bucket=s3_bucket, Key="models/tiny-other/config.json", Body=b"{}")
    endpoint = s3_server.endpoint_url

    path = download_uri(f"s3://{s3_bucket}/data/quotes.jsonl", tmp_path / "data", endpoint)
    assert path == tmp_path / "data" / "quotes.jsonl" and path.read_bytes() == b'{"content": "a"}\n'

    for uri in (f"s3://{s3_bucket}/models/tiny", f"s3://{s3_bucket}/models/tiny/"):
        dest = tmp_path / uri.rstrip("/").replace("/", "_").replace(":", "")
        assert download_uri(uri, dest, endpoint) == dest
        assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
            "config.json", "tokenizer/vocab.txt"]

    with pytest.raises(DataError, match="data.path") as info:
        download_uri(f"s3://{s3_bucket}/data/nope.jsonl", tmp_path / "x", endpoint, field="data.path")
    assert f"s3://{s3_bucket}/data/nope.jsonl" in str(info.value)
    with pytest.raises(ServiceError, match="does not exist"):
        download_uri("s3://no-such-bucket-kubetune/data.jsonl", tmp_path / "y", endpoint)


def test_s3_operations_name_the_problem(s3_server, s3_bucket, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    missing = open_store("s3://no-such-bucket-kubetune/p", endpoint_url=s3_server.endpoint_url)
    for operation in (lambda: missing.upload_file(tmp_path / "f.txt", "k"), lambda: missing.write_bytes("k", b"1"),
                      lambda: missing.list(), lambda: missing.upload_dir(tmp_path, "d")):
        with pytest.raises(ServiceError, match="bucket 'no-such-bucket-kubetune' does not exist"):
            operation()
    store = open_store(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/nope.bin"):
        store.download_file("nope.bin", tmp_path / "nope.bin")


def test_s3_large_files_go_up_in_parts(s3_server, s3_bucket, tmp_path):
    data = bytes(range(256)) * (40 * 1024)  # 10 MiB: above boto3's 8 MiB multipart threshold
    (tmp_path / "big.bin").write_bytes(data)
    store = open_store(f"s3://{s3_bucket}/ckpt", endpoint_url=s3_server.endpoint_url)
    store.upload_file(tmp_path / "big.bin", "model.safetensors")
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="ckpt/model.safetensors")
    assert head["ContentLength"] == len(data) and "-" in head["ETag"]  # a multipart ETag
    assert store.download_file("model.safetensors", tmp_path / "back.bin").read_bytes() == data


def outage_store(proxy, bucket, retry_seconds):
    return S3Store(bucket, "runs/1", endpoint_url=proxy.url, retry_seconds=retry_seconds)


@pytest.mark.parametrize("outage_seconds", [pytest.param(3, id="3s"), pytest.param(15, id="15s", marks=pytest.mark.slow)])
def test_an_upload_during_an_s3_outage_is_retried_until_the_endpoint_is_back(outage_seconds, s3_server, s3_bucket,
                                                                            tmp_path, caplog):
    from tiny import SwitchableProxy

    (tmp_path / "ckpt.bin").write_bytes(b"weights" * 1000)
    proxy = SwitchableProxy(s3_server.endpoint_url)
    try:
        store = outage_store(proxy, s3_bucket, retry_seconds=outage_seconds + 30)
        proxy.down_for(outage_seconds)
        store.upload_file(tmp_path / "ckpt.bin", "ckpt/a.bin")
        assert store.read_bytes("ckpt/a.bin") == b"weights" * 1000
        assert any("retrying in" in r.getMessage() for r in caplog.records)
    finally:
        proxy.down()


def test_without_retries_an_outage_fails_at_once_naming_the_field(s3_server, s3_bucket, tmp_path):
    from tiny import SwitchableProxy

    (tmp_path / "f").write_bytes(b"x")
    proxy = SwitchableProxy(s3_server.endpoint_url)
    proxy.down()
    with pytest.raises(ServiceError, match=r"storage.uri = .*cannot reach the S3 endpoint"):
        outage_store(proxy, s3_bucket, retry_seconds=0).upload_file(tmp_path / "f", "k")


def test_a_refusal_is_not_retried(s3_server, tmp_path):
    import time

    (tmp_path / "f").write_bytes(b"x")
    store = S3Store("no-such-bucket-here", endpoint_url=s3_server.endpoint_url, retry_seconds=60)
    started = time.monotonic()
    with pytest.raises(ServiceError, match="does not exist"):
        store.upload_file(tmp_path / "f", "k")
    assert time.monotonic() - started < 10
