"""Tokens (hashed, scoped, reloaded), the failure limiter, the token CLI, TLS and mTLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fakesite import fake_agent, site_config

from siteagent.agent.api.auth import (
    FailureLimiter,
    Principal,
    Scope,
    TokenFileError,
    TokenStore,
    create_token,
    hash_token,
    parse_tokens,
    ssl_options,
)
from siteagent.agent.api.http import serve_api
from siteagent.agent.config import ApiConfig, ConfigError, parse_config
from siteagent.agent.tools.cli import main as cli_main


def test_scopes_are_ordered_and_parsed() -> None:
    assert Scope.READ < Scope.OPERATE < Scope.ADMIN
    assert Scope.parse(" Operate ") is Scope.OPERATE
    with pytest.raises(ValueError, match="read, operate or admin"):
        Scope.parse("root")


def test_token_file_parsing() -> None:
    digest = hash_token("t").hex()
    entries = parse_tokens(f"# ops\n\nalice:operate:sha256:{digest}\n")
    assert [(e.name, e.scope) for e in entries] == [("alice", Scope.OPERATE)]
    for bad in (
        "alice:operate:plain:secret",
        f"alice:god:sha256:{digest}",
        "alice:read:sha256:abcd",
        f"bad name:read:sha256:{digest}",
        "alice:read",
    ):
        with pytest.raises(TokenFileError, match=":1:"):
            parse_tokens(bad)


def test_create_token_stores_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "tokens"
    token = create_token(path, "alice", Scope.OPERATE)
    text = path.read_text()
    assert token not in text and hash_token(token).hex() in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert TokenStore(path).check(token) == Principal("alice", Scope.OPERATE)
    assert TokenStore(path).check(token + "x") is None
    with pytest.raises(ValueError, match="already exists"):
        create_token(path, "alice", Scope.READ)
    with pytest.raises(ValueError, match="bad token name"):
        create_token(path, "a:b", Scope.READ)


def test_token_store_reloads_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    store = TokenStore(path)
    assert store.entries() == [] and store.check("anything") is None
    first = create_token(path, "a", Scope.READ)
    assert store.check(first) == Principal("a", Scope.READ)
    second = create_token(path, "b", Scope.ADMIN)
    assert store.check(second) == Principal("b", Scope.ADMIN)
    path.write_text("garbage\n")
    assert store.check(first) is None  # a broken file admits no one
    path.unlink()
    assert store.check(second) is None


def test_token_create_cli_prints_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens"
    assert (
        cli_main(["token", "create", "ops-bot", "--scope", "admin", "--tokens-file", str(path)])
        == 0
    )
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert token.startswith("sat_") and "shown only now" in captured.err
    assert token not in path.read_text()
    assert TokenStore(path).check(token) == Principal("ops-bot", Scope.ADMIN)
    assert cli_main(["token", "create", "ops-bot", "--tokens-file", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[site]\ncap_w = 1000\n[state]\ndir = "{tmp_path / "state"}"\n')
    assert cli_main(["token", "create", "viewer", "--config", str(cfg)]) == 0
    assert "viewer:read:sha256:" in (tmp_path / "state" / "api-tokens").read_text()


def test_failure_limiter_slides_per_client() -> None:
    now = [0.0]
    lim = FailureLimiter(3, clock=lambda: now[0])
    for t in (0.0, 10.0, 20.0):
        now[0] = t
        assert lim.blocked_for_s("a") == 0
        lim.failed("a")
    assert lim.blocked_for_s("a") == pytest.approx(40.0)
    assert lim.blocked_for_s("b") == 0
    now[0] = 60.5  # the first failure has left the window
    assert lim.blocked_for_s("a") == 0


def test_api_config_tls_needs_cert_and_key() -> None:
    with pytest.raises(ConfigError, match="tls_key"):
        parse_config({"site": {"cap_w": 1000}, "api": {"tls_cert": "/c.pem"}})
    with pytest.raises(ConfigError, match="tls_client_ca"):
        parse_config({"site": {"cap_w": 1000}, "api": {"tls_client_ca": "/ca.pem"}})
    assert ssl_options(ApiConfig()) == {}
    opts = ssl_options(ApiConfig(tls_cert="c", tls_key="k", tls_client_ca="ca"))
    assert opts["ssl_cert_reqs"] == ssl.CERT_REQUIRED and opts["ssl_ca_certs"] == "ca"
    assert ApiConfig().host == "127.0.0.1"


# -- TLS and mTLS against the served API -----------------------------------------------------


def _cert(
    tmp: Path,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


async def test_mtls_requires_a_client_certificate(tmp_path: Path) -> None:
    ca = _cert(tmp_path, "ca", None, ca=True)
    _cert(tmp_path, "server", ca)
    _cert(tmp_path, "client", ca)
    tokens = tmp_path / "tokens"
    token = create_token(tokens, "alice", Scope.READ)
    cfg = site_config(
        str(tmp_path),
        cap_w=10_000,
        api={
            "port": 0,
            "tokens_file": str(tokens),
            "tls_cert": str(tmp_path / "server.pem"),
            "tls_key": str(tmp_path / "server.key"),
            "tls_client_ca": str(tmp_path / "ca.pem"),
        },
    )
    agent = await fake_agent(cfg, 2)
    server = await serve_api(agent, cfg)
    url = f"https://127.0.0.1:{server.port}/v1/status"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        assert server.scheme == "https"
        with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with_cert.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        async with httpx.AsyncClient(verify=with_cert) as http:
            r = await http.get(url, headers=headers)
            assert r.status_code == 200 and r.json()["devices"] == 2
        without = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        async with httpx.AsyncClient(verify=without) as http:
            with pytest.raises(httpx.TransportError):
                await http.get(url, headers=headers)
        async with httpx.AsyncClient() as http:  # plain HTTP to a TLS port
            with pytest.raises(httpx.TransportError):
                await http.get(url.replace("https", "http"), headers=headers)
    finally:
        await server.close()
        await agent.stop()
