"""Cloud Storage through the tests' GCS server (tests/conftest.py's `gcs_bucket`)."""

import os

import gcsfs


def test_the_gcs_fixture_serves_a_bucket_to_a_client_given_only_the_emulator_host(
    gcs_bucket, gcs_server
):
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_server.url
    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    bucket = gcs_bucket.removeprefix("gs://")
    fs.pipe(f"{bucket}/a/b.txt", b"hello")
    assert fs.ls(bucket, detail=False) == [f"{bucket}/a"]
    assert fs.cat(f"{bucket}/a/b.txt") == b"hello"
