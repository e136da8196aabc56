"""Key generation, key files and loading: lengths, permissions, sources, and that the key never shows."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest

from mexit.defense import ExactHasher, SecretKey, TimeGuard, generate_key, load_key, write_key_file
from mexit.defense.keys import MIN_KEY_BYTES
from mexit.errors import ConfigError

ENV = "MEXIT_TIMEGUARD_KEY_TEST"


def _assert_hidden(key: bytes, *texts: str) -> None:
    for text in texts:
        assert key.hex() not in text.lower()
        assert key.hex()[:16] not in text.lower()
        assert repr(bytes(key))[2:-1] not in text


def test_generate_key_is_random_and_long_enough() -> None:
    a, b = generate_key(), generate_key()
    assert isinstance(a, bytes) and len(a) == MIN_KEY_BYTES == 32
    assert a != b
    assert len(generate_key(48)) == 48
    with pytest.raises(ConfigError, match="at least 32"):
        generate_key(16)


def test_secret_key_is_redacted_everywhere() -> None:
    key = generate_key()
    assert isinstance(key, SecretKey)
    formatted = "{} {!r}".format(key, key)  # noqa: UP032 - str.format is a separate code path
    _assert_hidden(key, repr(key), str(key), f"{key}", f"{key!r}", formatted, repr([key]), repr({"k": key}))
    assert "redacted" in repr(key)
    # ...while staying usable as the bytes it is.
    assert bytes(key) == key and bytes.fromhex(key.hex()) == key
    assert key != generate_key()


def test_write_key_file_mode_0600_hex_and_no_overwrite(tmp_path) -> None:
    path = write_key_file(tmp_path / "sub" / "tg.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert len(bytes.fromhex(text.strip())) == 32
    with pytest.raises(ConfigError, match="already exists") as err:
        write_key_file(path)
    assert path.read_text() == text  # untouched
    _assert_hidden(bytes.fromhex(text), str(err.value))
    write_key_file(path, force=True)
    assert path.read_text() != text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["tg.key"]  # no temp files left behind


def test_write_key_file_mode_ignores_lax_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        path = write_key_file(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_key_from_file_and_env(tmp_path, monkeypatch) -> None:
    path = write_key_file(tmp_path / "k")
    from_file = load_key(path)
    assert isinstance(from_file, SecretKey) and from_file.hex() == path.read_text().strip()
    other = generate_key()
    monkeypatch.setenv(ENV, other.hex())
    assert load_key(env=ENV) == other
    assert load_key(path, env=ENV) == from_file  # an explicit file wins over the environment
    assert load_key(str(path)) == from_file


def test_load_key_errors_say_how_to_make_one_and_hide_the_key(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match="mexit keygen"):
        load_key(env=ENV)
    with pytest.raises(ConfigError, match=r"does not exist.*mexit keygen"):
        load_key(tmp_path / "missing.key")

    short = os.urandom(16)
    monkeypatch.setenv(ENV, short.hex())
    with pytest.raises(ConfigError, match=r"16 bytes.*mexit keygen") as err:
        load_key(env=ENV)
    _assert_hidden(short, str(err.value))

    bad = tmp_path / "bad.key"
    bad.write_text("zz" + os.urandom(32).hex())
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not hex") as err:
        load_key(bad)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    _assert_hidden(bytes.fromhex(bad.read_text()[2:]), str(err.value))


def test_group_readable_key_file_warns_without_leaking(tmp_path, caplog) -> None:
    path = write_key_file(tmp_path / "k")
    key = bytes.fromhex(path.read_text())
    with caplog.at_level(logging.DEBUG, logger="mexit"):
        load_key(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    path.chmod(0o644)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mexit"):
        assert load_key(path) == key
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "chmod 600" in warnings[0].getMessage()
    _assert_hidden(key, caplog.text)


def test_timeguard_refuses_short_keys_and_hides_the_key(caplog) -> None:
    with pytest.raises(ConfigError, match=r"shorter than the 32 bytes.*mexit keygen"):
        TimeGuard(0.01, b"x" * 31, ExactHasher())
    with pytest.raises(ConfigError, match="must be bytes"):
        TimeGuard(0.01, "0" * 64, ExactHasher())  # type: ignore[arg-type]
    key = generate_key()
    with caplog.at_level(logging.DEBUG):
        guard = TimeGuard(0.01, key, ExactHasher())
        guard.delays_s(np.zeros((3, 2), dtype=np.float32))
    _assert_hidden(key, repr(guard), str(guard), str(guard.describe()), caplog.text)
    # A plain-bytes key is wrapped, so it is redacted too.
    guard2 = TimeGuard(0.01, bytes(key), ExactHasher())
    _assert_hidden(key, repr(guard2), repr(vars(guard2)))
    _assert_hidden(bytes(guard2._prk), repr(vars(guard2)))  # the HKDF PRK is as secret as the key
