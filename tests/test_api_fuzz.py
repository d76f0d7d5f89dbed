"""Schemathesis against the served OpenAPI document, over loopback.

Every operation is fuzzed with schema-valid and schema-breaking requests under
each kind of credential. Wanted: never a 5xx; responses as documented; and no
write accepted (2xx) without a valid token of the right scope, nor any change
to the overrides in force.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fakesite import fake_agent, site_config
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from siteagent.agent.api.auth import Scope, create_token
from siteagent.agent.api.http import ApiServer, serve_api

# Per operation and run; SITEAGENT_FUZZ_EXAMPLES scales it up for a deeper run.
EXAMPLES = int(os.environ.get("SITEAGENT_FUZZ_EXAMPLES", "25"))
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Served:
    """The API with a fake site behind it, served from its own thread and event loop."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        tokens = state_dir / "tokens"
        self.tokens = {s: create_token(tokens, s.label, s) for s in Scope}
        self.cfg = site_config(
            str(state_dir),
            cap_w=60_000,
            domains=[{"id": "r1", "limit_w": 30_000}],
            api={
                "port": 0,
                "tokens_file": str(tokens),
                "auth_failures_per_minute": 100_000,
                "max_body_bytes": 4096,
            },
        )
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.server: ApiServer | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10) or self.server is None:
            raise RuntimeError(f"API did not start: {self.error!r}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.agent = await fake_agent(self.cfg, 20, domain=lambda i: "r1" if i < 10 else "site")
        self.server = await serve_api(self.agent, self.cfg)

    def active_ids(self) -> list[str]:
        assert self.server is not None
        return [o.id for o in self.server.manager.active()]

    def stop(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            await self.server.close()
            await self.agent.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.stop()


def _fuzz(served: Served, who: str, mode: GenerationMode, stats: Counter[str]) -> None:
    assert served.server is not None
    base = f"http://127.0.0.1:{served.server.port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    token = {
        "admin": served.tokens[Scope.ADMIN],
        "operate": served.tokens[Scope.OPERATE],
        "read": served.tokens[Scope.READ],
        "bogus": "sat_not-a-real-token",
        "none": None,
    }[who]
    may_write = who in ("admin", "operate")
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the served document has a bad operation: {result}"
        op = result.ok()

        @settings(
            max_examples=EXAMPLES if may_write else max(5, EXAMPLES // 3),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            headers = {
                k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
            }
            case.headers = headers
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            before = served.active_ids()
            response = case.call(base_url=base)
            stats["requests"] += 1
            stats[f"{response.status_code // 100}xx"] += 1
            assert response.status_code < 500, (case.method, case.path, response.text)
            if not may_write and case.method.upper() in WRITES:
                assert response.status_code >= 400, (who, case.method, case.path, response.text)
                assert served.active_ids() == before
            if mode is GenerationMode.POSITIVE and may_write:
                # Schema-valid requests with a good token: answers must match the document.
                case.validate_response(response)

        one()


@pytest.mark.parametrize("who", ["admin", "operate", "read", "none", "bogus"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_the_served_api(
    served: Served, who: str, mode: GenerationMode, capsys: pytest.CaptureFixture[str]
) -> None:
    stats: Counter[str] = Counter()
    _fuzz(served, who, mode, stats)
    with capsys.disabled():
        print(f"\nfuzz {who}/{mode.value}: {dict(stats)}")
    assert stats["requests"] > 0 and stats["5xx"] == 0
