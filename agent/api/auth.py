"""Who may use the API: bearer tokens with scopes, kept hashed, and a brake on guessing.

The tokens file holds one ``name:scope:sha256:HEX`` line per token (``#`` starts
a comment). A token is 32 random bytes, so one SHA-256 of it is as hard to
reverse as the token is to guess; a slow hash would only slow every request.
The plain token is printed once by ``siteagent token create`` and never stored
or logged. The file is re-read when it changes, so a new token works at once.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siteagent.agent.config import ApiConfig

TOKEN_PREFIX = "sat_"
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
DEFAULT_TOKENS_NAME = "api-tokens"


class Scope(enum.IntEnum):
    """What a token may do; each scope includes the ones below it."""

    READ = 1
    OPERATE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        """The scope's name as written in the tokens file."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Scope:
        """A scope from its name; ValueError naming the choices."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown scope {text!r}; expected read, operate or admin") from None


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One token as stored: its name, scope and SHA-256 digest."""

    name: str
    scope: Scope
    digest: bytes


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from."""

    name: str
    scope: Scope


class TokenFileError(Exception):
    """A tokens file that cannot be read or parsed."""


def hash_token(token: str) -> bytes:
    """SHA-256 of a token's UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str, source: str = "<tokens>") -> list[TokenEntry]:
    """Parse a tokens file; TokenFileError names the first bad line."""
    out: list[TokenEntry] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 4 or parts[2] != "sha256":
            raise TokenFileError(f"{source}:{n}: expected name:scope:sha256:HEX")
        name, scope_text, _, hex_digest = parts
        if not NAME_RE.match(name):
            raise TokenFileError(f"{source}:{n}: bad token name {name!r}")
        try:
            scope = Scope.parse(scope_text)
            digest = bytes.fromhex(hex_digest)
        except ValueError as e:
            raise TokenFileError(f"{source}:{n}: {e}") from None
        if len(digest) != 32:
            raise TokenFileError(f"{source}:{n}: a sha256 digest is 64 hex digits")
        out.append(TokenEntry(name, scope, digest))
    return out


class TokenStore:
    """The tokens file, re-read when its modification time or size changes."""

    def __init__(self, path: str | Path | None, entries: list[TokenEntry] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._entries: list[TokenEntry] = list(entries or [])
        self._stamp: tuple[int, int] | None = None

    def entries(self) -> list[TokenEntry]:
        """The current tokens; a file that vanished or broke keeps none (fail closed)."""
        if self.path is None:
            return self._entries
        try:
            st = self.path.stat()
        except OSError:
            self._entries, self._stamp = [], None
            return self._entries
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._entries = parse_tokens(self.path.read_text("utf-8"), str(self.path))
            except (OSError, UnicodeDecodeError, TokenFileError):
                self._entries = []
            self._stamp = stamp
        return self._entries

    def check(self, token: str) -> Principal | None:
        """The principal a presented token belongs to, or None; constant time per entry."""
        presented = hash_token(token)
        found: TokenEntry | None = None
        for e in self.entries():
            # Compare against every entry so the time taken does not say which one matched.
            if hmac.compare_digest(presented, e.digest) and found is None:
                found = e
        return None if found is None else Principal(found.name, found.scope)


def create_token(path: str | Path, name: str, scope: Scope) -> str:
    """Make a token, append its hash line to the tokens file (mode 0600), return the token."""
    if not NAME_RE.match(name):
        raise ValueError(f"bad token name {name!r}; use letters, digits and . _ @ - (up to 64)")
    p = Path(path)
    if p.exists():
        existing = parse_tokens(p.read_text("utf-8"), str(p))
        if any(e.name == name for e in existing):
            raise ValueError(f"a token named {name!r} already exists in {p}")
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    line = f"{name}:{scope.label}:sha256:{hash_token(token).hex()}\n"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def tokens_path(cfg: ApiConfig, state_dir: str) -> Path:
    """The tokens file: ``api.tokens_file``, else ``api-tokens`` in the state directory."""
    return Path(cfg.tokens_file) if cfg.tokens_file else Path(state_dir) / DEFAULT_TOKENS_NAME


class FailureLimiter:
    """Counts authentication failures per client address over a sliding minute."""

    WINDOW_S = 60.0
    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float] | None:
        q = self._failures.get(client)
        if q is None:
            return None
        cutoff = self.clock() - self.WINDOW_S
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[client]
            return None
        return q

    def blocked_for_s(self, client: str) -> float:
        """Seconds until this client may try again; 0 when not blocked."""
        q = self._recent(client)
        if q is None or len(q) < self.per_minute:
            return 0.0
        return max(0.0, q[-self.per_minute] + self.WINDOW_S - self.clock())

    def failed(self, client: str) -> None:
        """Count one failure from a client."""
        if client not in self._failures and len(self._failures) >= self.MAX_CLIENTS:
            # Bounded memory under a spray of addresses: forget the oldest client.
            del self._failures[next(iter(self._failures))]
        q = self._failures.setdefault(client, deque())
        q.append(self.clock())
        while len(q) > self.per_minute:
            q.popleft()


def ssl_options(cfg: ApiConfig) -> dict[str, Any]:
    """uvicorn's TLS keyword arguments for the API config; empty for plain HTTP."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return {}
    opts: dict[str, Any] = {"ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key}
    if cfg.tls_client_ca is not None:
        opts["ssl_ca_certs"] = cfg.tls_client_ca
        opts["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return opts
