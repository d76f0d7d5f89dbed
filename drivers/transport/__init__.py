"""How the drivers talk to miners, apart from what the firmware's replies mean.

As pyasic keeps its transports (``rpc/``, ``web/``) apart from its miners, the
connections live here and the firmware adapters in ``drivers.backends`` say only
what to read and what it means. One rule each, in ``rules``, for every kept
connection (a gRPC channel, a kept HTTP connection):

- keep-alive: a miner keeps a connection between calls only while the process's
  ``KEPT_CONNECTIONS`` budget allows (``KeepBudget``); past it a connection lives
  for one call (or one reading) as pyasic's do;
- a read that failed because a kept connection dropped under it is sent once more
  on a fresh connection (``once_more_if_dropped``), never more;
- a write is never sent again here: its outcome is unknown, and ``AsicDriver``
  re-reads state before any retry.

``grpc`` is the kept gRPC channel (Braiins OS), ``http`` the kept HTTP connection
(VNish: an aiohttp session; stock Antminer: the digest challenge kept) and ``rpc``
the 4028 JSON API (one request per connection: the firmware closes it after its
answer, so nothing is kept and nothing is resent).
"""

from __future__ import annotations

from siteagent.drivers.transport.rules import KEPT_CONNECTIONS, KeepBudget, once_more_if_dropped

__all__ = ["KEPT_CONNECTIONS", "KeepBudget", "once_more_if_dropped"]
