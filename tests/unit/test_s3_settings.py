"""Where an s3:// registry takes its credentials, region and endpoint (the AWS tools' order), how its URL is
checked, and the folder Storage's exclusive create (what the object store's If-None-Match: * mirrors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kit.config import load_config
from kit.errors import ConfigError, RegistryCorruptError
from kit.registry.remote import open_storage
from kit.registry.s3 import aws_settings, parse_s3_url
from kit.registry.storage import NOT_MODIFIED, FolderStorage, check_key


def _files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = DEF\naws_secret_access_key = defsecret\n"
                                          "[team]\naws_access_key_id = TEAM\naws_secret_access_key = teamsecret\n")
    (tmp_path / "config").write_text("[default]\nregion = eu-west-1\n[profile team]\nregion = auto\n"
                                     "endpoint_url = https://acct.r2.cloudflarestorage.com\n")
    return {"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "config")}


def test_settings_follow_the_aws_order(tmp_path: Path):
    env = _files(tmp_path)
    assert aws_settings(env) == {"access_key_id": "DEF", "secret_access_key": "defsecret", "region": "eu-west-1"}
    team = aws_settings({**env, "AWS_PROFILE": "team"})
    assert team == {"access_key_id": "TEAM", "secret_access_key": "teamsecret", "region": "auto",
                    "endpoint": "https://acct.r2.cloudflarestorage.com"}
    over = aws_settings({**env, "AWS_PROFILE": "team", "AWS_ACCESS_KEY_ID": "ENV", "AWS_SECRET_ACCESS_KEY": "s",
                         "AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"})
    assert over == {"access_key_id": "ENV", "secret_access_key": "s", "region": "us-west-2",
                    "endpoint": "http://127.0.0.1:9000"}  # a key pair is never mixed from two places
    assert aws_settings({"HOME": str(tmp_path / "nobody")}) == {"region": "us-east-1"}


def test_a_broken_settings_file_is_named(tmp_path: Path):
    (tmp_path / "config").write_text("region = x\n")  # no section header
    with pytest.raises(ConfigError, match="not a readable AWS settings file"):
        aws_settings({"HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "config")})


@pytest.mark.parametrize("url", ["s3://", "s3://b", "s3://UPPER/x", "s3://bucket//x", "s3://bucket/a/../b", "s3:/x"])
def test_bad_urls_are_refused_with_the_form(url: str):
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        parse_s3_url(url)


def test_urls_parse_and_config_keeps_them(tmp_path: Path):
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_url("s3://my-bucket/team/models/") == ("my-bucket", "team/models")
    cfg = load_config(cwd=tmp_path, environ={"KIT_REGISTRY": "s3://my-bucket/team/"})
    assert cfg.registry == "s3://my-bucket/team"
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        load_config(cwd=tmp_path, environ={"KIT_REGISTRY": "s3://x"})
    with pytest.raises(ConfigError, match="Unsupported registry URL"):
        open_storage("gs://bucket/x")


def test_folder_storage_creates_once_and_answers_unchanged(tmp_path: Path):
    st = FolderStorage(tmp_path)
    assert st.put_if_absent("m/moves/00000001.json", b"a") is True
    assert st.put_if_absent("m/moves/00000001.json", b"b") is False
    got = st.get("m/moves/00000001.json", 10)
    assert got is not None and got.data == b"a"
    assert st.get_if_changed("m/moves/00000001.json", got.etag, 10) is NOT_MODIFIED
    assert st.list_keys("m") == ["m/moves/00000001.json"] and st.folders("") == ["m"]
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(RegistryCorruptError):
            check_key(bad)
