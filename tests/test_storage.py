"""Cloud storage helpers against a local S3 server: what --resume-from and --pretrained_weights read back."""
import pyarrow.fs as pafs
import pytest

from dino_ray.core.storage import exists, fetch, is_uri, join


def test_uris_and_local_paths():
    assert is_uri("s3://bucket/run") and is_uri("gs://bucket/run")
    assert not is_uri("outputs/run") and not is_uri("file:///tmp/run")
    assert join("s3://bucket/", "run", "checkpoint.pth") == "s3://bucket/run/checkpoint.pth"


def test_fetch_from_s3(s3_server, tmp_path):
    location = join(s3_server, "runs", "a", "mlflow_run_id.txt")
    assert not exists(location)
    s3, path = pafs.FileSystem.from_uri(location)
    with s3.open_output_stream(path) as stream:
        stream.write(b"0123abcd")
    assert exists(location) and exists(join(s3_server, "runs", "a"))
    local = fetch(location, tmp_path / "copy")
    assert local == tmp_path / "copy" / "mlflow_run_id.txt" and local.read_text() == "0123abcd"
    with pytest.raises(FileNotFoundError, match="runs/a/missing.pth"):
        fetch(join(s3_server, "runs", "a", "missing.pth"), tmp_path)
    assert exists(tmp_path / "copy" / "mlflow_run_id.txt") and not exists(tmp_path / "nothing")
