"""The `siteagent` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from siteagent.agent.config import ConfigError, load_config

if TYPE_CHECKING:
    from siteagent.agent.api.overrides import Override
    from siteagent.agent.control.fleet import DeviceRecord
    from siteagent.agent.control.loop import Agent

log = logging.getLogger("siteagent")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# sysexits' EX_CONFIG (systemd shows it as status=78/CONFIG): `run` cannot start until an
# operator acts (a store it refuses), so the unit does not restart it every few seconds.
EXIT_NEEDS_OPERATOR = 78


def _version() -> str:
    try:
        return version("siteagent")
    except PackageNotFoundError:
        return "unknown"


def _setup_logging(level: str) -> None:
    # asyncssh still names DSA keys, which cryptography deprecates: ten lines of
    # warnings at its import, about nothing this agent uses (it never offers DSA).
    from cryptography.utils import CryptographyDeprecationWarning

    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh\.")
    # The API client's every request, at info: the command's own output says what happened.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # One line per event, no timestamps: journald adds its own.
    # APScheduler warns on every coalesced run; sweep and tick durations tell the same story.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    # pymodbus warns on every failed connect (a line a second at a meter's interval); the
    # agent's meter state logs a fault once and its recovery once (agent/control/meter.py).
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pyasic sets the root logger to WARNING when imported (after this runs); our own
    # loggers carry the level themselves so info lines still reach journald.
    logging.getLogger("siteagent").setLevel(getattr(logging, level.upper()))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file; exit 2 listing every problem."""
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"{e.source}: {len(e.problems)} problem(s):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{args.config}: ok (site {cfg.site.name!r}, cap {cfg.site.cap_w:.0f} W, "
        f"{len(cfg.domains)} domain(s), {len(cfg.inventory.miners)} listed miner(s), "
        f"{len(cfg.inventory.scan)} scan range(s))"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the simulated-site demo."""
    from siteagent.agent.tools.demo import run_demo, summary

    out = sys.stdout
    report = asyncio.run(
        run_demo(
            args.miners,
            gpu_nodes=args.gpu_nodes,
            gpus_per_node=args.gpus_per_node,
            base=args.base,
            gpu_base=args.gpu_base,
            time_scale=args.time_scale,
            out=out,
            meter=args.meter,
            meter_address=args.meter_address,
        )
    )
    print(summary(report), file=out)
    if args.report == "json":
        print(json.dumps(report), file=out)
    return EXIT_OK if report["seconds_over_cap"] == 0 else EXIT_FAIL


async def _run_agent(config_path: str, restore_backup: bool = False) -> int:
    from siteagent.agent.api.http import serve_api
    from siteagent.agent.api.runtime import OverrideRuntime
    from siteagent.agent.api.store import prepare_store
    from siteagent.agent.control.identify import identify, identify_deadline_s
    from siteagent.agent.control.inventory import (
        build_devices,
        close_drivers,
        scan,
        startup_addresses,
    )
    from siteagent.agent.control.inventory_store import InventoryStore
    from siteagent.agent.control.loop import Agent
    from siteagent.agent.control.startup import straggler_quiet_s, until_quiet
    from siteagent.agent.control.workers import make_workers, workers_for
    from siteagent.agent.ops.metrics import loop_healthy, serve_metrics, site_summary
    from siteagent.agent.ops.sdnotify import (
        Notifier,
        StartupProgress,
        supervise,
        watch_startup,
        watchdog_period_s,
    )
    from siteagent.agent.tools.reload import Reloader, ReloadSignal

    cfg = load_config(config_path)
    # Before minutes of identification: a damaged override store refuses the start now.
    prepare_store(cfg.state.dir, restore=restore_backup, backups_kept=cfg.state.backups_kept)
    notifier = Notifier.from_env()
    # Before startup: identification at scale takes minutes, and a SIGTERM then must
    # stop the agent cleanly, not kill it by default.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (`systemctl reload`) re-reads the config; by default it would end the process.
    hangup = ReloadSignal()
    loop.add_signal_handler(signal.SIGHUP, hangup)
    # Every identification and reading ends within its deadline, so a startup that
    # finishes nothing for three of them is stuck: systemd may end it then.
    startup = StartupProgress(
        notifier, extend_s=startup_extend_s(identify_deadline_s(cfg.telemetry.timeout_s))
    )
    opened: list[Callable[[], Awaitable[object]]] = []  # closes, in the order opened

    async def start() -> tuple[Agent, Callable[[], Awaitable[object]]]:
        if cfg.policy.name == "economic":
            # Before anything listens: the compile holds the event loop for a second or two.
            startup.phase("compiling the economic plan")
            _warm_up_economic()
        store = InventoryStore(Path(cfg.state.dir) / "inventory.sqlite")
        opened.append(_closing(store.close))
        n_addresses = startup_addresses(cfg)
        # Telemetry workers identify the miners they will read and keep them connected:
        # start-up's identification is shared over the cores, each miner connected once.
        n_workers = workers_for(cfg, n_addresses + len(cfg.gpu_nodes))
        telemetry = None
        if n_workers:
            startup.phase("starting telemetry workers")
            telemetry = make_workers(cfg, n_workers)
            opened.append(telemetry.close)
            await telemetry.launch()
        startup.phase("identifying miners", n_addresses)
        t = time.perf_counter()
        trackers = await build_devices(
            cfg,
            store,
            on_identified=startup.step,
            identifier=identify if telemetry is None else telemetry.identify,
        )
        opened.append(lambda: close_drivers(trackers))
        log.info(
            "identified %d device(s) in %d address(es) in %.1f s",
            len(trackers),
            n_addresses,
            time.perf_counter() - t,
        )
        log.info("starting with %d device(s), cap %.0f W", len(trackers), cfg.site.cap_w)
        # The config in force, not the one read at start: a reload may change the ranges.
        # Later scans identify in the workers too, off the loop's core, and the workers
        # then read what they found (``Agent.adopt``).
        identifier = identify if telemetry is None else telemetry.identify
        agent = Agent(
            cfg, trackers, rescan=lambda: scan(agent.config, store, identifier=identifier)
        )
        if telemetry is not None:
            telemetry.fleet, telemetry.clock = agent.fleet, agent.clock
            await telemetry.adopt()
            agent.telemetry = telemetry
        metrics = serve_metrics(agent, cfg.metrics.host, cfg.metrics.port, version=_version())
        opened.append(_closing(metrics.close))
        log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, metrics.port)
        # Restores the stored overrides before the first tick; expires them and backs the
        # store up with or without the API, and closes after the agent has stopped.
        runtime = OverrideRuntime.open(agent, cfg)
        opened.append(runtime.close)
        runtime.start()
        api = await serve_api(agent, cfg, runtime=runtime)
        hangup.prepare(
            Reloader(
                config_path,
                agent,
                store=runtime.store,
                notifier=notifier,
                status=lambda: site_summary(agent),
            )
        )
        close_api = api.close  # one object: the stop path closes it first, then the rest
        opened.append(close_api)
        # READY once every device has been read once, or once only devices that do not
        # answer are left (nothing read for quiet_s): those count at their worst case
        # (never read: unknown) until read, so the site is safe to control.
        startup.phase("first sweep", len(agent.fleet), count=lambda: _read_once(agent))
        t = time.perf_counter()
        first = loop.create_task(agent.sweep())
        opened.append(lambda: _cancelled(first))  # closed first: it reads through the drivers
        n, quiet_s = len(agent.fleet), straggler_quiet_s(cfg.telemetry.timeout_s)
        if await until_quiet(lambda: _read_once(agent), first.done, quiet_s):
            await first
            log.info("first sweep of %d device(s) in %.1f s", n, time.perf_counter() - t)
        else:
            read = _read_once(agent)
            log.info(
                "first sweep: %d of %d device(s) read in %.1f s; the %d left count at their "
                "worst case until read",
                read,
                n,
                time.perf_counter() - t,
                n - read,
            )
        if cfg.openadr is not None:
            # Once the site is read: the VEN answers events by what the site can shed. Its
            # events go into the runtime's book; it stops before the store closes.
            from siteagent.agent.grid.openadr import Ven

            ven = Ven(agent, runtime.events, cfg.openadr)
            await ven.start()
            opened.append(ven.stop)
        startup.phase("starting the control loop")
        # Drivers, trackers and pyasic's objects live as long as the agent: keep them out
        # of the collector's passes (10-26% less CPU per sweep at 10,000 miners, bench/).
        gc.collect()
        gc.freeze()
        agent.start()
        return agent, close_api

    watcher = loop.create_task(watch_startup(startup))
    starting = loop.create_task(start())
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        starting.cancel()
        stopping.cancel()
        raise
    finally:
        watcher.cancel()
    if not starting.done():
        where = startup.line()
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        # Nothing is sent before the control loop starts, the last step of startup.
        line = f"stopping during startup ({where} done); nothing was changed on any device"
        log.info(line)
        notifier.stopping(line)
        for close in reversed(opened):
            await close()
        return EXIT_OK
    stopping.cancel()
    agent, close_api = starting.result()
    started_s = agent.clock()
    notifier.ready(site_summary(agent))
    hangup.start()
    watchdog_s = watchdog_period_s()
    supervisor = loop.create_task(
        supervise(
            notifier,
            healthy=lambda: loop_healthy(agent, started_s),
            status=lambda: site_summary(agent),
            period_s=watchdog_s or cfg.control.interval_s,
            watchdog=watchdog_s is not None,
        )
    )
    await stop.wait()
    hangup.stop()
    log.info("stopping: finishing the tick in flight, leaving devices where they are")
    notifier.stopping("stopping: finishing the tick in flight, leaving devices where they are")
    supervisor.cancel()
    await close_api()
    await agent.stop()
    left = f"stopping: {left_behind(agent.fleet.records())}"
    log.info(left)
    notifier.status(left)
    for close in reversed(opened):
        if close is not close_api:
            await close()
    return EXIT_OK


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` (a sweep still running) and wait for it to end."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _closing(close: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """A synchronous close as an awaitable one."""

    async def closing() -> object:
        return close()

    return closing


def left_behind(devices: Iterable[DeviceRecord]) -> str:
    """What the agent leaves on the devices as it stops, in words."""
    from siteagent.domain import DeviceKind

    asleep = reduced = gpus = 0
    for t in devices:
        top_w = t.capabilities.power_target_max_w or t.nameplate_power_w
        lowered = t.power_target_w is not None and t.power_target_w < top_w - 1.0
        if t.kind is DeviceKind.MINER and t.awake is False:
            asleep += 1
        elif t.kind is DeviceKind.MINER and lowered:
            reduced += 1
        elif t.kind is DeviceKind.GPU and lowered:
            gpus += 1
    if not (asleep or reduced or gpus):
        return "no device asleep or held below its full level"
    return (
        f"{asleep} miner(s) asleep, {reduced} at reduced targets, {gpus} GPU(s) at reduced "
        "limits; they stay so until the agent starts again"
    )


def startup_extend_s(step_deadline_s: float) -> float:
    """How long (s) startup may go without finishing a step before systemd ends it:
    three of the slowest steps' deadlines, at least 30 s."""
    return max(30.0, 3 * step_deadline_s)


def _read_once(agent: Agent) -> int:
    """Devices the first sweep has read (or failed to read) so far."""
    return agent.fleet.tried()


def _warm_up_economic() -> None:
    """Compile the economic plan's kernels before the first tick, and say what it cost."""
    from siteagent.policies import economic, fill

    t = time.perf_counter()
    economic.warm_up()
    cached = "not cached on disk here" if fill.UNCACHED else "cached on disk"
    log.info("economic plan compiled in %.1f s (%s)", time.perf_counter() - t, cached)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM."""
    import sqlite3

    from siteagent.agent.api.http import ApiStartError
    from siteagent.agent.api.store import StoreError

    try:
        return asyncio.run(_run_agent(args.config, args.restore_backup))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except StoreError as e:
        if not isinstance(e.__cause__, OSError | sqlite3.Error):
            # The store's check refused it (damaged, emptied, writes lost): it stays so
            # until an operator restores or moves it, so no restart (systemd/README.md).
            print(
                f"siteagent run: cannot start: {e} (exit {EXIT_NEEDS_OPERATOR}: not restarted "
                "until an operator acts)",
                file=sys.stderr,
            )
            return EXIT_NEEDS_OPERATOR
        # The file system or SQLite failed while opening it: may pass, systemd retries.
        print(f"siteagent run: cannot start: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (ApiStartError, OSError) as e:
        # Port taken, state directory unusable: say so in one line (systemd restarts us).
        print(f"siteagent run: cannot start: {e}", file=sys.stderr)
        return EXIT_FAIL


async def _plan_once(config_path: str) -> int:
    from siteagent.agent.control.inventory import build_devices, close_drivers
    from siteagent.agent.control.loop import Agent

    cfg = load_config(config_path)
    agent = Agent(cfg, await build_devices(cfg))
    try:
        # What `run` would plan: the configured policy, the overrides in the store, the
        # schedule in force (in ``limits``).
        in_force = _overrides_in_force(agent)
        await agent.sweep()
        snap, limits = agent.snapshot(), agent.limits()
        plan = agent.plan(snap, limits)
    finally:
        await close_drivers(agent.fleet.links())
    for ov in in_force:
        print(f"override {ov.id}: {ov.describe()} (by {ov.actor})")
    print(
        f"effective cap {limits.effective_cap_w:.0f} W (from {limits.cap_source}); "
        f"worst case now {snap.budget_w + limits.overhead_w:.0f} W"
    )
    print(f"plan ({cfg.policy.name}): {plan.mode}: {plan.reason}; planned {plan.planned_w:.0f} W")
    for sp in plan.setpoints:
        print(f"  {sp.device_id}: {sp.reason}")
    return EXIT_OK


def _overrides_in_force(agent: Agent) -> list[Override]:
    """Apply the stored overrides in force to ``agent``, reading the store only (nothing
    expired or ended: that is the running agent's to record)."""
    from siteagent.agent.api.overrides import OverrideManager
    from siteagent.agent.api.store import DB_NAME, Store

    path = Path(agent.config.state.dir) / DB_NAME
    if not path.exists():
        return []
    store = Store.read_only(path)
    try:
        manager = OverrideManager(agent, store, max_ttl_s=agent.config.api.max_override_ttl_s)
        applied = manager.apply_in_force()
        # The stored grid events too (read now: the book keeps them in memory). Set, not
        # ``set_grid_caps``: a dry run asks for no tick.
        from siteagent.agent.api.events import EventBook, configured_limits_w

        agent.grid_caps = EventBook(store, limits_w=configured_limits_w(agent.config))
        return applied
    finally:
        store.close()


def cmd_plan(args: argparse.Namespace) -> int:
    """Read the site once and print the plan without sending anything."""
    from siteagent.agent.api.store import StoreError

    if not args.dry_run:
        print("siteagent plan: only --dry-run is supported (nothing is ever sent)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_plan_once(args.config))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except StoreError as e:
        print(f"siteagent plan: cannot read the overrides: {e}", file=sys.stderr)
        return EXIT_FAIL


def cmd_sim(args: argparse.Namespace) -> int:
    """Run a simulated site until stopped."""
    from siteagent.sim.serve import main as sim_main

    return sim_main(args.sim_args)


def _cmd_backtest(args: argparse.Namespace) -> int:
    from siteagent.agent.tools.backtest import cmd_backtest

    return cmd_backtest(args)


def parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    p = argparse.ArgumentParser(
        prog="siteagent",
        description="Moves power between Bitcoin mining and AI inference under a site cap.",
    )
    p.add_argument("--version", action="version", version=f"siteagent {_version()}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run the agent (as systemd does)")
    s.add_argument("--config", "-c", default="/etc/siteagent/siteagent.toml")
    s.add_argument(
        "--restore-backup",
        action="store_true",
        help="if the override store is damaged or missing, keep it aside and start from the "
        "newest good copy (saying what it lacks)",
    )
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="run the agent on a simulated site and report")
    s.add_argument("--miners", type=int, default=50)
    s.add_argument("--gpu-nodes", type=int, default=4)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--base", default="127.1.0.1", help="first simulated miner's address")
    s.add_argument("--gpu-base", default="127.2.0.1", help="first simulated GPU node's address")
    s.add_argument("--report", choices=["text", "json"], default="text")
    s.add_argument(
        "--time-scale", type=float, default=1.0, help="stretch (>1) or shrink each demo phase"
    )
    s.add_argument(
        "--meter",
        action="store_true",
        help="a site meter (SunSpec over Modbus TCP) the agent reads, an auxiliary load "
        "swinging ±30%% and miners under-reporting by 10%%",
    )
    s.add_argument("--meter-address", default="127.3.0.1", help="the simulated meter's address")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("check-config", help="validate a config file")
    s.add_argument("config", type=Path)
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("plan", help="read the site and print the plan")
    s.add_argument("--config", "-c", default="/etc/siteagent/siteagent.toml")
    s.add_argument("--dry-run", action="store_true", help="print only; send nothing")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("backtest", help="replay a price series under each policy vs an LP bound")
    s.add_argument("--config", "-c", default=None, help="site config (default: a synthetic site)")
    s.add_argument(
        "--prices",
        default=None,
        help="price series (.csv or .json); leave out with a --config whose prices.source "
        "is 'sources' to replay those (ERCOT, hashprice index, AI contract)",
    )
    s.add_argument("--miners", type=int, default=60, help="synthetic site: miners")
    s.add_argument("--gpus", type=int, default=16, help="synthetic site: GPUs (8 to a node)")
    s.add_argument("--days", type=float, default=None, help="replay only the first N days")
    s.add_argument(
        "--plot", default=None, help="write a PNG here: $ per day against the bound, power, prices"
    )
    s.add_argument("--report", choices=["text", "json"], default="text")
    s.add_argument(
        "--switching",
        choices=["on", "off"],
        default="on",
        help="charge sleep/wake cycles and depreciation (off: free switching, to compare)",
    )
    s.set_defaults(func=_cmd_backtest)

    s = sub.add_parser(
        "sim", help="run a simulated site (`siteagent sim --miners N --mix ...`)", add_help=False
    )
    s.add_argument("sim_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_sim)

    from siteagent.agent.tools.client import add_commands

    add_commands(sub)  # override, status, token: the API client
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.func is cmd_sim:
        # Everything after `sim` is the simulator's own (`--miners 5 --mix ...`, `--help`).
        args.sim_args = [a for a in [*extra, *args.sim_args] if a != "--"]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.log_level)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
