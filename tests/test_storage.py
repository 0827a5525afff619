"""Cloud storage helpers against a local S3 server: what --resume-from and --pretrained_weights read back."""
import pytest

from dino_ray.storage import exists, fetch, is_uri, join, read_text, write_text


def test_uris_and_local_paths():
    assert is_uri("s3://bucket/run") and is_uri("gs://bucket/run")
    assert not is_uri("outputs/run") and not is_uri("file:///tmp/run")
    assert join("s3://bucket/", "run", "checkpoint.pth") == "s3://bucket/run/checkpoint.pth"


def test_round_trip_through_s3(s3_server, tmp_path):
    location = join(s3_server, "runs", "a", "mlflow_run_id.txt")
    assert not exists(location)
    write_text(location, "0123abcd")
    assert exists(location) and read_text(location) == "0123abcd"
    local = fetch(location, tmp_path / "copy")
    assert local == tmp_path / "copy" / "mlflow_run_id.txt" and local.read_text() == "0123abcd"
    with pytest.raises(FileNotFoundError, match="runs/a/missing.pth"):
        fetch(join(s3_server, "runs", "a", "missing.pth"), tmp_path)


def test_local_paths_too(tmp_path):
    write_text(tmp_path / "deep" / "note.txt", "kept")
    assert exists(tmp_path / "deep" / "note.txt") and read_text(tmp_path / "deep" / "note.txt") == "kept"
