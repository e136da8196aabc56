"""The TimeGuard secret key: generation, key files and loading, without ever showing the key.

TimeGuard's delays are only unpredictable to an attacker who does not know the key, so the key is
32+ random bytes from the OS generator (the reference used the constant ``b'asecretseed'``), kept in a
hex text file of mode 0600 or in an environment variable, and redacted from every repr, log line and
error message this module produces.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from mexit._io import atomic_path
from mexit.errors import ConfigError

logger = logging.getLogger(__name__)

MIN_KEY_BYTES = 32
DEFAULT_KEY_ENV = "MEXIT_TIMEGUARD_KEY"
_HOW_TO_MAKE = "make one with `mexit keygen --out KEYFILE` (or mexit.defense.write_key_file)"


class SecretKey(bytes):
    """Key bytes whose ``repr``/``str``/``format`` are redacted, so logging or printing one leaks nothing.

    It *is* ``bytes`` (HKDF and ``bytes(key)`` see the real value); only the textual forms are hidden.
    Equality is constant-time so that comparing keys cannot become a timing side channel of its own.
    """

    def __repr__(self) -> str:
        return f"SecretKey(<redacted, {len(self)} bytes>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, bytes | bytearray | memoryview):
            return NotImplemented
        return hmac.compare_digest(bytes(self), bytes(other))

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = bytes.__hash__


def as_secret_key(key: bytes | bytearray | SecretKey, *, source: str = "the TimeGuard key") -> SecretKey:
    """Check ``key`` is long enough and wrap it; the error names the source and the fix, never the value."""
    if not isinstance(key, bytes | bytearray):
        raise ConfigError(f"{source} must be bytes, not {type(key).__name__}; {_HOW_TO_MAKE}")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{source} is {len(key)} bytes, shorter than the {MIN_KEY_BYTES} bytes TimeGuard needs; {_HOW_TO_MAKE}"
        )
    return key if isinstance(key, SecretKey) else SecretKey(bytes(key))


def generate_key(n: int = MIN_KEY_BYTES) -> SecretKey:
    """``n`` (>= 32) fresh random bytes from the OS CSPRNG."""
    if n < MIN_KEY_BYTES:
        raise ConfigError(f"a TimeGuard key needs at least {MIN_KEY_BYTES} bytes, {n} were asked for")
    return SecretKey(secrets.token_bytes(n))


def write_key_file(path: str | os.PathLike[str], *, force: bool = False, n: int = MIN_KEY_BYTES) -> Path:
    """Write a new random key to ``path`` as hex text, mode 0600, atomically; return the path.

    Refuses to replace an existing file unless ``force``: a silently rotated key changes every
    delay, and a server restarted with it would hand an attacker fresh delays to average over.
    """
    target = Path(path)
    if target.exists() and not force:
        raise ConfigError(f"key file {target} already exists; pass --force (force=True) to replace it")
    if target.is_dir():
        raise ConfigError(f"key file {target} is a directory; give a file path")
    key = generate_key(n)
    with atomic_path(target, private=True) as tmp:
        # mkstemp already creates 0600; chmod again before any byte is written, in case of a lax umask.
        os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR)
        tmp.write_text(key.hex() + "\n", encoding="ascii")
    os.chmod(target, stat.S_IRUSR | stat.S_IWUSR)
    logger.info("wrote a %d-byte TimeGuard key to %s", n, target)
    return target


def load_key(key_file: str | os.PathLike[str] | None = None, env: str = DEFAULT_KEY_ENV) -> SecretKey:
    """Load the hex-encoded key from ``key_file`` if given, else from the environment variable ``env``.

    Raises :class:`ConfigError` when neither is available, the text is not hex, or the key is shorter
    than 32 bytes. Warns (logging) when the key file is readable by group or others.
    """
    if key_file is not None:
        path = Path(key_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise ConfigError(f"TimeGuard key file {path} does not exist; {_HOW_TO_MAKE}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read TimeGuard key file {path} ({type(exc).__name__}); check it is a "
                              f"readable hex text file, or {_HOW_TO_MAKE}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("TimeGuard key file %s is accessible by group/others (mode %03o); run `chmod 600 %s`",
                           path, stat.S_IMODE(mode), path)
        source = f"the key in {path}"
    else:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"no TimeGuard key: give a key file or set the environment variable {env} "
                              f"to a hex key; {_HOW_TO_MAKE}")
        text = value
        source = f"the key in ${env}"
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        # `from None`: the underlying message could quote part of the text.
        raise ConfigError(f"{source} is not hex-encoded; {_HOW_TO_MAKE}") from None
    return as_secret_key(raw, source=source)
