"""The `p402` command.

Each subcommand is a small function taking the parsed arguments and returning an
exit code. Errors we expect (bad flags, unknown models, upstream failures) print
one line on stderr and exit non-zero; a traceback never reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .core.errors import P402Error
from .core.sessions import SESSION_STATUSES
from .tui.format import fine_usd

Handler = Callable[[argparse.Namespace], int]


# --- helpers shared by commands ---------------------------------------------------


def settings_from(args: argparse.Namespace):
    # Imported when a command needs it: core.config costs 0.4 s of start-up `p402 --help` need not pay.
    from .core.config import settings_from

    return settings_from(args)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    print(line(headers))
    for row in cells:
        print(line(row))


def _is_number(text: str) -> bool:
    try:
        float(text.lstrip("$"))
    except ValueError:
        return False
    return True


def usd(value: float) -> str:
    return f"${value:.4f}" if value >= 0.01 else fine_usd(value)


def read_text_arg(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def db_exists(args: argparse.Namespace, settings) -> bool:
    """Whether the database a report reads exists. A report on a --db that names no file says so (a typo
    reported as $0 would mislead); the default database merely has no traffic yet."""
    from .core.config import is_store_url

    if is_store_url(settings.db_path) or Path(settings.db_path).expanduser().is_file():
        return True  # a server's database without P402's tables is refused when opened, by name
    if getattr(args, "db", None):
        from .service import StoreError

        raise StoreError(f"no P402 database at {settings.db_path}: nothing has been recorded there")
    return False


@asynccontextmanager
async def open_service(settings, *, create: bool, must_exist: bool = False) -> AsyncIterator[Any]:
    """The use cases on the database. Without `create`, a file not made yet reads as an empty one:
    reading never creates it."""
    from . import service

    async with service.open_service(settings.db_path, settings.catalog, create=create, must_exist=must_exist) as found:
        yield found


DB_HELP = "database file, or postgresql://user@host:port/dbname (default: the user data dir; or P402_DB)"


def where(settings) -> str:
    """The store a command uses, as messages name it: a file's path, or a URL without its password."""
    from .core.config import describe_store

    return describe_store(settings.db_path)


def written_to(settings) -> str:
    return f"(in {where(settings)})"


# --- foundation commands --------------------------------------------------------------


def cmd_providers(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    rows = []
    for pid, provider in settings.providers.items():
        rows.append(
            {
                "id": pid,
                "name": provider.spec.name,
                "wire": provider.spec.wire,
                "base_url": provider.base_url,
                "models": len(settings.catalog.models_of(pid)),
                "configured": provider.usable,
                "enabled": provider.enabled,
                "key_env": provider.spec.api_key_env,
            }
        )
    if args.json:
        print_json(rows)
    else:
        print_table(
            ["ID", "NAME", "WIRE", "MODELS", "CONFIGURED", "KEY ENV", "BASE URL"],
            [[r["id"], r["name"], r["wire"], r["models"], "yes" if r["configured"] else "no",
              " or ".join(r["key_env"]) or "-", r["base_url"]] for r in rows],
        )
        if not any(r["configured"] for r in rows):
            print("\nno provider is configured: export one KEY ENV variable (or set api_key under [providers.<id>] "
                  "in the config), or point P402 at `p402 sim` (see README), or try `p402 serve --sim`")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Each configured provider's route, DNS, TCP, TLS and an authenticated call; exit 1 when one fails."""
    from .providers.doctor import diagnose

    settings = settings_from(args)
    if not settings.usable_providers():
        raise _no_provider_error()
    checkups = run_async(diagnose(settings, args.provider or None))
    if isinstance(checkups, int):
        return checkups
    if args.json:
        print_json([c.to_dict() for c in checkups])
    else:
        mark = {True: "ok", False: "FAIL", None: "-"}
        rows = []
        for c in checkups:
            steps = {s.name: s for s in c.steps}
            rows.append([c.provider, c.route] + [mark[steps[n].ok] if n in steps else "" for n in ("dns", "tcp", "tls", "auth")]
                        + [c.verdict])  # fmt: skip
        print_table(["PROVIDER", "ROUTE", "DNS", "TCP", "TLS", "AUTH", "VERDICT"], rows)
        for c in checkups:
            for step in c.steps:
                if step.name != "route" and step.ok is not None:
                    print(f"  {c.provider} {step.name}: {step.detail}" + (f" ({step.ms:g} ms)" if step.ms is not None else ""))
            if c.fix:
                print(f"  {c.provider} fix: {c.fix}")
    return 1 if any(c.verdict != "ok" for c in checkups) else 0


def cmd_models(args: argparse.Namespace) -> int:
    from datetime import date

    from .core.types import CAPABILITIES, TIER_RANK

    settings = settings_from(args)
    models = list(settings.catalog.models.values())
    if args.provider:
        settings.catalog.provider(args.provider)  # raises a clear error for an unknown id
        models = [m for m in models if m.provider == args.provider]
    if args.capability:
        for cap in args.capability:
            if cap not in CAPABILITIES:
                raise P402Error(f"unknown capability {cap!r}; choose from {', '.join(CAPABILITIES)}")
        models = [m for m in models if m.has(set(args.capability))]
    if args.max_tier:
        models = [m for m in models if m.tier_rank <= TIER_RANK[args.max_tier]]
    today = date.today().isoformat()  # as the router counts a model retired
    rows = [
        m.to_dict() | {"deprecated_on": m.deprecated_on, "retired": m.deprecated_on is not None and m.deprecated_on <= today}
        for m in models
    ]
    if args.json:
        print_json(rows)
    else:
        print_table(
            ["ID", "TIER", "CONTEXT", "IN $/1M", "OUT $/1M", "CAPABILITIES", "RETIRED"],
            [
                [r["id"], r["tier"], f"{r['context_window']:,}", *(("unpriced", "-") if not r["priced"] else
                 (r["input_per_1m"], r["output_per_1m"])), ",".join(r["capabilities"]), _retirement(r)]
                for r in rows
            ],
        )
    return 0


def _retirement(row: dict[str, Any]) -> str:
    """`retired 2026-02-19` (the router no longer picks it), `from 2026-08-05` (announced), or nothing."""
    if row["deprecated_on"] is None:
        return ""
    return f"retired {row['deprecated_on']}" if row["retired"] else f"from {row['deprecated_on']}"


# What `p402 compare` prices when not told: one chat turn with some context, and a paragraph back.
COMPARE_INPUT_TOKENS = 1_000
COMPARE_OUTPUT_TOKENS = 500


def cmd_compare(args: argparse.Namespace) -> int:
    from .core.costs import compare

    settings = settings_from(args)
    rows = compare(
        settings.catalog,
        args.input_tokens,
        args.output_tokens,
        require=set(args.capability or ("chat",)),
        top=args.top,
        max_tier=args.max_tier,
    )
    if args.json:
        print_json([r.to_dict() for r in rows])
    else:
        # On stderr: the table stays the whole of stdout, for whatever it is piped to.
        print(f"one call of {args.input_tokens:,} tokens in and {args.output_tokens:,} out "
              "(--input-tokens, --output-tokens)", file=sys.stderr)
        print_table(
            ["MODEL", "TIER", "IN $/1M", "OUT $/1M", "COST"],
            [[r.id, r.tier, r.input_per_1m, r.output_per_1m, usd(r.cost_usd)] for r in rows],
        )
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from .core.tokens import count_text

    model = None
    if args.model:
        from .core.catalog import load_catalog

        model = load_catalog().model(args.model).id
    result = count_text(read_text_arg(args.text), model)
    if args.json:
        print_json({"tokens": result.tokens, "tokenizer": result.tokenizer, "exact": result.exact, "model": model})
    else:
        exact = "exact" if result.exact else "estimate"
        print(f"{result.tokens} token{'s' if result.tokens != 1 else ''} ({result.tokenizer}, {exact})")
    return 0


def cmd_catalog_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .core.catalog import import_litellm_prices, load_catalog, merge_overrides, read_overrides
    from .core.config import default_overrides_path

    path = Path(args.file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise P402Error(f"no such file: {path}") from None
    except (OSError, ValueError) as error:
        raise P402Error(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise P402Error(f"{path} is not a LiteLLM price file (expected a JSON object of models)")
    target = Path(args.overrides) if args.overrides else default_overrides_path()
    existing = read_overrides(target) if target.exists() else {}
    catalog = load_catalog(overrides_path=target)  # what earlier imports added counts as known
    providers = set(_listed(args.provider)) if args.provider else None
    for pid in sorted(providers or ()):
        catalog.provider(pid)  # an unknown id is a clear error
    overrides, report = import_litellm_prices(data, catalog, providers)
    merged = merge_overrides(existing, overrides)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    summary = {
        "overrides_file": str(target),
        "updated": report.updated,
        "added": report.added,
        "unchanged": report.unchanged,
        "unknown": report.unknown,
    }
    if args.json:
        print_json(summary)
    else:
        print(f"updated {len(report.updated)} models, added {len(report.added)}, {report.unchanged} unchanged, "
              f"{report.unknown} entries of unknown models ignored -> {target}")
    return 0


# --- chat and the simulator ---------------------------------------------------------------


_ROUTE_HELP = """\
Flags that steer the router (p402 route, p402 chat):
  --mode M          cost | quality | speed | balanced | adaptive (default: the config's router.mode)
  --require C       a capability every candidate must have (repeatable, or comma-separated)
  --prefer P        try this provider's models first (repeatable)
  --exclude P       never this provider (repeatable)
  --max-tier T      budget | mid | premium: no tier above this
  --max-cost USD    no model whose estimated cost for this request is higher
"""


def _listed(values: list[str] | None) -> tuple[str, ...]:
    """Repeatable flags that may also be comma-separated: --require vision,json_mode."""
    return tuple(part.strip() for value in values or () for part in value.split(",") if part.strip())


def route_options_from(args: argparse.Namespace, *, model: str | None = None, failover: bool = True):
    from .core.hooks import RouteOptions

    return RouteOptions.from_dict({
        "mode": args.mode,
        "require": _listed(args.require),
        "prefer": _listed(args.prefer),
        "exclude": _listed(args.exclude),
        "max_tier": args.max_tier,
        "max_cost_usd": args.max_cost,
        "model": model,
        "failover": failover,
        "max_retries": getattr(args, "max_retries", None),
    })


def _messages(args: argparse.Namespace) -> list[dict[str, str]]:
    prompt = read_text_arg(args.prompt)
    if not prompt.strip():
        raise P402Error("the prompt is empty")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    return messages


def _no_provider_error(hint: str = "") -> P402Error:
    from .core.errors import ConfigError

    return ConfigError(
        "no provider is configured: set a provider's API key (`p402 providers` shows where), "
        f"or point P402 at `p402 sim`{hint}"
    )


def _require_usable(settings, model_ref: str) -> None:
    """A pinned model's provider must be callable; say exactly what is missing."""
    from .core.errors import ConfigError

    spec = settings.catalog.resolve(model_ref)  # `provider/<any id>` passes through, unpriced
    provider = settings.providers[spec.provider]
    if not provider.enabled:
        raise ConfigError(f"provider {spec.provider!r} is disabled in the config")
    if not provider.usable:
        where = " or ".join(provider.spec.api_key_env) or "api_key"
        raise ConfigError(
            f"provider {spec.provider!r} has no API key: set {where}, or api_key under [providers.{spec.provider}]"
        )


async def chat_once(
    settings, request, options, on_text: Callable[[str], None] | None = None, *, ctx=None, persist: bool = True
) -> dict[str, Any]:
    """One request through the orchestrator (routing, failover); the answer, usage, cost, timing and attempts.

    `on_text` sees the text as it arrives. A stream that breaks after its first words
    returns what came, with `error` set. With `persist` the request goes into the
    ledger and through the cache (`cached`, `saved_usd`); `ctx` carries session, tag,
    namespace and the cache opt-out.
    """
    from .core.hooks import CallContext
    from .providers.base import StreamAssembler
    from .runtime import Runtime

    if options.model is not None and options.model not in settings.aliases:
        _require_usable(settings, options.model)
    elif not settings.usable_providers():
        raise _no_provider_error()
    error = None
    async with Runtime.open(settings, persist=persist) as runtime:
        orchestrator = runtime.orchestrator
        ctx = ctx or CallContext(source="cli")
        if ctx.session_id is not None and runtime.service.persistent:
            ctx.session_id = await runtime.service.resolve_session(ctx.session_id)
        if request.stream:
            assembler = None
            async with orchestrator.stream(request, options, ctx) as stream:
                async for chunk in stream:
                    if chunk.error is not None:
                        error = chunk.error
                        continue
                    if assembler is None:
                        assembler = StreamAssembler(stream.meta.provider, stream.meta.model)
                    if chunk.content and on_text is not None:
                        on_text(chunk.content)
                    assembler.add(chunk)
            response = assembler.response() if assembler is not None else None
            if response is not None and stream.usage is not None:
                response.usage = stream.usage  # as billed: the provider's, or our count when it sent none
            meta = stream.meta
        else:
            response = await orchestrator.complete(request, options, ctx)
            meta = response.p402
            if response.content and on_text is not None:
                on_text(response.content)
    usage = response.usage if response is not None else None
    result: dict[str, Any] = {
        "content": response.content if response is not None else "",
        "provider": meta.provider,
        "model": f"{meta.provider}/{meta.model}",
        "upstream_model": response.model if response is not None else meta.model,
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "total_tokens": usage.total_tokens,
        },
        "usage_estimated": meta.usage_estimated,  # the provider sent no usage: tokens and cost are our count
        "cost_usd": meta.cost_usd,
        "priced": meta.priced,
        "dropped_params": list(meta.dropped_params),
        "latency_ms": round(meta.latency_ms, 3),
        "ttft_ms": None if meta.ttft_ms is None else round(meta.ttft_ms, 3),
        "finish_reason": "error" if error is not None else response.finish_reason,
        "attempts": meta.to_dict()["attempts"],
        "decision_id": meta.decision_id,
        "cached": meta.cached,
        "saved_usd": meta.saved_usd,
        "request_id": ctx.request_id,
    }
    if error is not None:
        result["error"] = error
    if response is not None:
        if response.reasoning:
            result["reasoning"] = response.reasoning
        if response.tool_calls:
            result["tool_calls"] = response.tool_calls
        if response.extra:
            result.update(response.extra)
    return result


def cmd_chat(args: argparse.Namespace) -> int:
    from .core.types import ChatRequest

    settings = settings_from(args)
    request = ChatRequest(messages=_messages(args), max_tokens=args.max_tokens, stream=args.stream)
    # --model pins one model and calls it alone; without it, or naming an alias, the router chooses and fails over.
    options = route_options_from(args, model=args.model, failover=args.model is None or args.model in settings.aliases)
    ctx = chat_context(args, settings)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run_async(chat_once(settings, request, options, on_text=None if args.json else show, ctx=ctx))
    if isinstance(result, int):  # interrupted
        return result
    broken = result.get("error")
    if args.json:
        print_json(result)
    else:
        for call in result.get("tool_calls") or ():
            function = call.get("function") or {}
            sys.stdout.write(f"[tool call] {function.get('name')}({function.get('arguments')})\n")
        if result["content"]:
            sys.stdout.write("\n")
    if broken:
        print(f"p402: {broken['kind']}: {broken['message']}", file=sys.stderr)
        return 1
    return 0


def chat_context(args: argparse.Namespace, settings):
    """Who asks and how the answer is kept: --session, --tag, --namespace, --cache/--no-cache."""
    from .core.errors import ConfigError
    from .core.hooks import CallContext, reserved_namespace

    if args.namespace is not None and (reason := reserved_namespace(args.namespace)) is not None:
        raise ConfigError(f"--namespace: {reason}")
    if args.cache is not None:  # one request per process: the flag is the cache's setting for this run
        settings.file.cache.enabled = args.cache
    return CallContext(
        source="cli",
        session_id=args.session,
        tag=args.tag,
        namespace=args.namespace,
        cache=args.cache is not False,
    )


def cmd_route(args: argparse.Namespace) -> int:
    from .core.router import Router
    from .core.tokens import count_text
    from .core.types import ChatRequest

    settings = settings_from(args)
    if args.all:
        router = Router(settings.catalog, settings.router, aliases=settings.aliases)
    else:
        router = Router.from_settings(settings)
        if not router.usable:
            raise _no_provider_error("; or add --all to route over the whole catalog")
    request = ChatRequest(messages=_messages(args), max_tokens=args.max_tokens)
    count_text("")  # load the tokenizer first: a process's start-up, not the decision's time
    decision = router.route(request, route_options_from(args))
    if args.json:
        print_json(decision.to_dict())
    else:
        _print_decision(decision, args.top)
    if decision.chosen is None:
        print(f"p402: no_eligible_model: {decision.why_none()}", file=sys.stderr)
        return 1
    return 0


def _print_decision(decision, top: int) -> None:
    print(
        f"{decision.id}  mode {decision.mode}  {decision.prompt_tokens} prompt tokens + "
        f"{decision.est_output_tokens} expected out  decided in {decision.decision_us:.1f} us"
    )
    chosen = decision.chosen
    if chosen is not None:
        print(f"chosen: {chosen.id} ({chosen.tier})  est {usd(chosen.est_cost_usd)}  score {chosen.score:.3f}")
        print()
        rows = [
            [i, c.id, c.tier, f"{c.score:.3f}", f"{c.cost:.2f}", f"{c.quality:.2f}", f"{c.speed:.2f}",
             f"{c.health:.2f}", usd(c.est_cost_usd), f"{c.est_latency_ms:.0f}"]
            for i, c in enumerate(decision.candidates[:top], 1)
        ]
        print_table(["#", "MODEL", "TIER", "SCORE", "COST", "QUALITY", "SPEED", "HEALTH", "EST $", "EST MS"], rows)
        more = len(decision.candidates) - top
        if more > 0:
            print(f"... {more} more candidates (--top N, or --json for all)")
    if decision.excluded:
        counts: dict[str, int] = {}
        for item in decision.excluded:
            reason = item.reason.split(" on ", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        print(f"excluded {len(decision.excluded)}: {parts}")


def cmd_sim(args: argparse.Namespace) -> int:
    import signal

    from .sim.server import start_sim

    settings = settings_from(args)
    catalog = settings.catalog

    async def serve() -> None:
        try:
            running = await start_sim(
                catalog, host=args.host, port=args.port, seed=args.seed, latency=not args.no_latency, speed=args.speed,
                azure_deployments=settings.azure_deployments(),
                usage=not args.no_usage,
            )
        except OSError as error:
            raise P402Error(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
        url = running.url
        pace = "no latency" if args.no_latency else f"latency x{1 / args.speed:g}"
        print(f"p402 sim: {len(catalog.providers)} providers at {url} (seed {args.seed}, {pace}); Ctrl-C stops it")
        print(f"  each provider is at {url}/<provider><its official base path>, e.g. {url}/openai/v1")
        print("  in config.toml, a provider at the simulator (each the same way):")  # as TOML that reads back
        print(f'    [providers.openai]\n    base_url = "{url}/openai/v1"\n    api_key = "any"')
        fault = '{"provider": "openai", "kind": "rate_limit"}'
        print(f"  faults: POST {url}/_sim/faults {fault}; stats: GET {url}/_sim/stats")
        sys.stdout.flush()
        await running.task

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal; both end here quietly.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .tui import demo

    return demo.run(args)


def cmd_console(args: argparse.Namespace) -> int:
    if args.attach:
        from .tui.attach import run_attached

        return run_attached(args.attach, args.key, args.refresh)
    from .tui.launch import run_console

    return run_console(args, settings_from(args))


# --- the gateway -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .core.gil import share_promptly
    from .gateway.memory import limit_arenas

    limit_arenas()  # before any thread allocates: a thread's arena keeps what it freed
    share_promptly()
    from .logs import from_flags, server_logs

    settings = from_flags(settings_from(args), args)
    host = args.host or settings.gateway.host
    port = settings.gateway.port if args.port is None else args.port
    workers = settings.gateway.workers if args.workers is None else args.workers
    from .gateway.workers import Worker
    from .runtime import ledger_for

    worker = Worker.from_environ()
    if worker is not None:
        with server_logs(settings):
            return run_served(serve_gateway(settings, host, port, sim=False, worker=worker))
    with ledger_for(settings, simulated=args.sim, named=bool(args.db)) as ledger, server_logs(settings):
        if workers > 1:
            return run_async(supervise(args, settings, host, port, workers, ledger=ledger))
        return run_served(serve_gateway(settings, host, port, sim=args.sim, ledger=ledger))


def _up_line(url: str, sim_url: str | None, ledger: str, more: str = "") -> str:
    upstream = f"; providers simulated at {sim_url}" if sim_url else ""
    recording = f"; {ledger}" if ledger else ""
    return f"p402 gateway at {url} (OpenAI base_url {url}/v1{upstream}){recording}{more}; Ctrl-C stops it"


async def serve_gateway(settings, host: str, port: int, *, sim: bool, ledger: str = "", worker=None) -> int:
    """The gateway, headless, until SIGINT or SIGTERM; then a drain: new connections are refused, requests in
    flight get `[gateway] drain_timeout_s` to finish (a second signal cuts them at once), the ledger is flushed.

    As one of `p402 serve --workers`'s processes (`worker`), it listens on the port beside the other
    workers, tells the parent when it is ready instead of printing, and stops on SIGTERM or when the
    parent is gone.
    """
    import logging
    import signal

    log = logging.getLogger("p402.gateway")
    sim_url = worker.sim_url if worker else None
    try:
        return await _serve_until_stopped(settings, host, port, sim_url=sim_url, sim=sim, ledger=ledger,
                                          worker=worker, log=log)
    finally:
        # Stopped, the ledger flushed: what is left is the interpreter's exit, which a further signal
        # must not turn into a death by signal (exit code -15 after a clean stop).
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)


async def _serve_until_stopped(settings, host: str, port: int, *, sim_url, sim: bool, ledger: str, worker,
                               log) -> int:
    import signal

    from .runtime import Runtime

    async with Runtime.open(settings, sim=sim, sim_url=sim_url) as runtime:
        gateway = await runtime.serve_gateway(host, port, sock=worker.socket(host, port) if worker else None)
        # What start-up made (modules, the catalog, validators) lives as long as the process: out of
        # the collector's sight, full collections scan only what requests leave behind.
        gc.collect()
        gc.freeze()
        # Caught before the line that says it is up: a supervisor may signal as soon as it reads it.
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        stopping = asyncio.create_task(stop.wait())
        watched = {stopping, gateway.task}
        if worker is not None:
            watched.add(asyncio.create_task(worker.orphaned()))
            worker.ready()
        else:
            print(_up_line(gateway.url, runtime.sim_url, ledger), flush=True)
        if not settings.usable_providers() and (worker is None or worker.slot == 1):
            log.warning("p402 serve: not ready: %s; every chat request is refused and /health answers 503 until one is",
                        _no_provider_error(" (or run p402 serve --sim)"))
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            for task in watched - {gateway.task}:
                task.cancel()
        if gateway.task.done():  # it stopped by itself: say why
            gateway.task.result()
            raise P402Error("the gateway stopped unexpectedly")
        runtime.gateways.remove(gateway)
        bound = settings.gateway.drain_timeout_s
        log.info("draining: new connections refused; %d request(s) in flight get up to %gs to finish",
                    gateway.in_flight, bound)
        forced: list[int] = []

        def cut_now(signum: int) -> None:
            forced.append(signum)
            gateway.cut_now()

        for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal: cut them now
            loop.add_signal_handler(signum, cut_now, signum)
        try:
            cut = await gateway.stop()
        finally:
            # Until the ledger is flushed and the store closed (the end of this block), a further signal must
            # not kill the process by its default action mid-flush: it is noted and otherwise ignored.
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, log.info, "%s while the ledger is flushed: ignored", signum.name)
        if cut:
            why = f"by a second signal ({signal.Signals(forced[0]).name})" if forced else f"past the {bound:g}s bound"
            log.warning("drained: %d request(s) cut short %s", cut, why)
        else:
            log.info("drained: every request in flight finished")
    log.info("stopped: the ledger is flushed")
    return 0


async def supervise(args: argparse.Namespace, settings, host: str, port: int, count: int, *, ledger: str) -> int:
    """`p402 serve --workers N`: N workers sharing the port (gateway.workers), one simulator for all."""
    import signal

    from .gateway.workers import CannotStart, Supervisor, fleet_env, reserve

    sock = reserve(host, port)
    try:
        sim = None
        if args.sim:
            from .sim.server import start_sim

            sim = await start_sim(settings.catalog, azure_deployments=settings.azure_deployments())
        bound = sock.getsockname()[1]
        argv = [sys.executable, "-m", "p402_tui.cli", "serve", "--host", host, "--port", str(bound)]
        if getattr(args, "config", None):
            argv += ["--config", args.config]
        # The database as the user named it, or the temporary one a simulated run records into.
        db = args.db or (str(settings.db_path) if args.sim else None)
        if db:
            argv += ["--db", db]
        if args.log_format:
            argv += ["--log-format", args.log_format]
        if args.log_level:
            argv += ["--log-level", args.log_level]
        if args.no_access_log:
            argv.append("--no-access-log")
        fleet = fleet_env(settings.file.fleet, settings.env, host, bound)
        supervisor = Supervisor(count, argv, sim.url if sim else None, env=fleet, grace_s=settings.gateway.drain_timeout_s)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            starting = asyncio.create_task(supervisor.start())
            await asyncio.wait({starting, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # stopped while starting
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return await supervisor.stop()
            try:
                starting.result()
            except CannotStart as error:  # the worker said why, in its own line
                return error.code if error.code and error.code > 0 else 1
            shown = f"[{host}]" if ":" in host else host
            pids = ", ".join(map(str, supervisor.pids))
            print(_up_line(f"http://{shown}:{bound}", sim.url if sim else None, ledger, f"; {count} workers (pids {pids})"),
                  flush=True)
            await stop.wait()
            print(f"p402 gateway: stopping {count} workers; in-flight requests may finish", file=sys.stderr, flush=True)
            code = await supervisor.stop()
            if code:
                print("p402 serve: a worker did not stop cleanly (see above)", file=sys.stderr, flush=True)
            return code
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            if sim is not None:
                await sim.stop()
    finally:
        sock.close()


def run_served(coro) -> int:
    """Like `run_async`, on uvloop when it is installed: a server's every request goes through the loop."""
    try:
        import uvloop
    except ImportError:
        return run_async(coro)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except KeyboardInterrupt:
        return 130


def cmd_keys(args: argparse.Namespace) -> int:
    return run_async(_keys(args, settings_from(args)))


def _key_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy fields given on the command line (`p402 keys create|update`)."""
    given = {
        "budget_usd": args.budget_usd, "budget_period": args.budget_period, "rpm": args.rpm, "tpm": args.tpm,
        "models": args.models or None, "max_tier": args.max_tier, "max_cost_per_request_usd": args.max_cost_usd,
        "redact": args.redact or None, "deny": args.deny or None,
    }  # fmt: skip
    policy = {field: value for field, value in given.items() if value is not None}
    defaults = {"mode": args.mode, "tag": args.tag, "namespace": args.namespace, "session_prefix": args.session_prefix}
    if any(v is not None for v in defaults.values()):
        policy["defaults"] = {k: v for k, v in defaults.items() if v is not None}
    return policy


def _print_key(key: dict[str, Any]) -> None:
    usage = key["usage"]
    budget = "none" if usage["budget_usd"] is None else f"{usd(usage['budget_usd'])} a {usage['period']}"
    print(f"{key['id']}  {key['name']}  role {key['role']}  {'active' if key['active'] else 'revoked'}")
    print(f"  spent {usd(usage['spent_usd'])} over {usage['requests']} requests this {usage['period']}; budget {budget}")
    print(f"  policy {json.dumps(key['policy'], sort_keys=True)}")


async def _keys(args: argparse.Namespace, settings) -> int:
    command = args.keys_command
    async with open_service(settings, create=command == "create") as service:
        if command == "create":
            record, secret = await service.create_key(args.name, role=args.role, policy=_key_policy(args))
            if args.json:
                print_json({**record, "key": secret})
            else:
                print(f"created gateway key {record['id']} ({record['name']}, {record['role']}) {written_to(settings)}; "
                      "it is shown only this once:")
                print(secret)
                print("clients send it as `Authorization: Bearer <key>` (the OpenAI SDK's api_key)", file=sys.stderr)
            return 0
        if command == "list":
            found = await service.keys()
            if args.json:
                print_json(found)
            else:
                print_table(
                    ["ID", "NAME", "ROLE", "PREFIX", "CREATED", "SPENT", "BUDGET", "ACTIVE"],
                    [[k["id"], k["name"], k["role"], k["prefix"] + "...", _when(k["created"]), usd(k["usage"]["spent_usd"]),
                      "-" if k["usage"]["budget_usd"] is None else usd(k["usage"]["budget_usd"]),
                      "yes" if k["active"] else "revoked"] for k in found],
                )
            return 0
        if command == "show":
            key = await service.key(args.id)
        elif command == "update":
            key = await service.update_key(
                args.id, name=args.name, role=args.role, policy=_key_policy(args), clear=tuple(args.clear or ())
            )
        else:
            key = await service.revoke_key(args.id)
        if args.json:
            print_json(key)
        else:
            if command != "show":
                print(f"{'updated' if command == 'update' else 'revoked'} {args.id} {written_to(settings)}")
            _print_key(key)
    return 0


def _when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


# --- ledger, sessions, cost intelligence, cache ------------------------------------------------


def cmd_spend(args: argparse.Namespace) -> int:
    from .service.spend import period_label

    settings = settings_from(args)
    label = period_label(args.period, start=args.start, end=args.end) + (f", key {args.key}" if args.key else "")

    async def report() -> dict[str, Any]:
        async with open_service(settings, create=False) as service:
            return await service.spend(args.period, by=args.by, start=args.start, end=args.end,
                                       include_simulated=args.include_simulated, api_key_id=await _key_id(service, args))

    fresh = not db_exists(args, settings)
    result = run_async(report())
    if isinstance(result, int):
        return result
    if args.json:
        print_json(result)
        return 0
    if fresh:
        print(f"{label}: $0 over 0 requests: no traffic yet (nothing recorded in {where(settings)})")
        return 0
    print(f"{label}: {usd(result['total_usd'])} over {result['requests']} requests "
          f"({result['cached']} from the cache, saving {usd(result['saved_usd'])}; {result['errors']} failed)")
    if result.get("simulated_left_out"):
        print(f"{result['simulated_left_out']} simulated requests left out (--include-simulated counts them)")
    unpriced = result["unpriced"]
    if unpriced["requests"]:
        print(f"unpriced: {unpriced['requests']} requests to models without a known price, "
              f"{unpriced['prompt_tokens']:,} tokens in, {unpriced['completion_tokens']:,} out (not in the total)")
    if result["breakdown"]:
        print()
        print_table([args.by.upper(), "COST", "REQUESTS", "SAVED"],
                    [[b["key"], "unpriced" if b["cost_usd"] is None else usd(b["cost_usd"]), b["requests"],
                      usd(b["saved_usd"])] for b in result["breakdown"]])
    return 0


async def _key_id(service: Any, args: argparse.Namespace) -> str | None:
    """The id of the gateway key `--key` names (by id or name), or None without one."""
    return None if args.key is None else await service.resolve_key(args.key)


def cmd_sessions(args: argparse.Namespace) -> int:
    return run_async(_sessions(args, settings_from(args)))


async def _sessions(args: argparse.Namespace, settings) -> int:
    async with open_service(settings, create=args.sessions_command == "create") as service:
        action = args.sessions_command
        if action in ("show", "update", "delete"):
            args.id = await service.resolve_session(args.id)
        if action == "list":
            found = await service.sessions(status=args.status, api_key_id=await _key_id(service, args))
            if args.json:
                print_json(found)
            else:
                print_table(
                    ["ID", "NAME", "STATUS", "BUDGET", "SPENT", "REQUESTS"],
                    [[s["id"], s["name"], s["status"], "-" if s["budget_usd"] is None else usd(s["budget_usd"]),
                      usd(s["spent_usd"]), s["requests"]] for s in found],
                )
            return 0
        if action == "create":
            session = await service.create_session(
                args.name, budget_usd=args.budget, agent=args.agent, metadata=_json_object(args.metadata)
            )
        elif action == "show":
            session = await service.session(args.id)
            session["messages"] = await service.session_messages(args.id, limit=args.messages)
        elif action == "update":
            changes: dict[str, Any] = {}
            for flag in ("name", "status", "agent"):
                if getattr(args, flag) is not None:
                    changes[flag] = getattr(args, flag)
            if args.no_budget:
                changes["budget_usd"] = None
            elif args.budget is not None:
                changes["budget_usd"] = args.budget
            if args.metadata is not None:
                changes["metadata"] = _json_object(args.metadata)
            if not changes:
                raise P402Error("nothing to change: give --name, --budget, --no-budget, --status, --agent or --metadata")
            session = await service.update_session(args.id, **changes)
        else:
            await service.delete_session(args.id)
            if args.json:
                print_json({"id": args.id, "deleted": True})
            else:
                print(f"deleted {args.id} {written_to(settings)}; its requests stay in the ledger")
            return 0
    if args.json:
        print_json(session)
    else:
        budget = "no budget" if session["budget_usd"] is None else f"budget {usd(session['budget_usd'])}"
        print(f"{session['id']}  {session['name']}  {session['status']}  {budget}  "
              f"spent {usd(session['spent_usd'])} in {session['requests']} requests")
        if args.sessions_command in ("create", "update"):
            print(f"{args.sessions_command}d {written_to(settings)}", file=sys.stderr)
        for message in session.get("messages", ()):
            print(f"  [{message['role']}] {message['content']}")
    return 0


def _json_object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise P402Error(f"--metadata is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise P402Error("--metadata must be a JSON object, like '{\"team\": \"research\"}'")
    return value


def cmd_decisions(args: argparse.Namespace) -> int:
    from .core.router import RouteDecision

    settings = settings_from(args)

    async def read() -> dict[str, Any] | None:
        async with open_service(settings, create=False, must_exist=True) as service:
            return await service.decision(args.id)

    found = run_async(read())
    if isinstance(found, int):
        return found
    if found is None:
        raise P402Error(f"no decision {args.id!r} in {where(settings)}")
    if args.json:
        print_json(found)
    else:
        _print_decision(RouteDecision.from_dict(found), args.top)
    return 0


def cmd_recommendations(args: argparse.Namespace) -> int:
    from .service.spend import period_label

    settings = settings_from(args)
    label = period_label(args.period, start=args.start, end=args.end) + (f", key {args.key}" if args.key else "")

    async def advise() -> list[dict[str, Any]]:
        async with open_service(settings, create=False) as service:
            return await service.recommendations(args.period, start=args.start, end=args.end,
                                                 include_simulated=args.include_simulated,
                                                 api_key_id=await _key_id(service, args))

    fresh = not db_exists(args, settings)
    found = run_async(advise())
    if isinstance(found, int):
        return found
    if args.json:
        print_json(found)
    elif fresh:
        print(f"nothing to recommend: no traffic yet (nothing recorded in {where(settings)})")
    elif not found:
        print(f"nothing to recommend from the ledger ({label})")
    else:
        for number, item in enumerate(found, 1):
            saving = "" if item["monthly_saving_usd"] is None else f"  (~{usd(item['monthly_saving_usd'])}/month)"
            print(f"{number}. {item['title']}{saving}")
            print(f"   {item['detail']}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """The store's upkeep: status (read-only), migrate, prune old history."""
    from .service import operations

    settings = settings_from(args)
    path = settings.db_path

    async def act() -> dict[str, Any]:
        if args.db_command == "status":
            return await operations.status(path)
        if args.db_command == "migrate":
            return await operations.migrate(path)
        older_than = operations.age_seconds(args.older_than)
        async with open_service(settings, create=False, must_exist=True) as service:
            return {"older_than": args.older_than, **await service.prune(older_than)}

    found = run_async(act())
    if isinstance(found, int):
        return found
    if args.json:
        print_json(found)
    elif args.db_command == "status":
        if not found["exists"]:
            print(f"no database at {found['path']} yet (it is made on first use; `p402 db migrate` makes it now)")
            return 0
        state = "current" if found["up_to_date"] else "behind: run `p402 db migrate`"
        if (found["schema_version"] or 0) > found["current_version"]:
            state = "newer than this P402: upgrade p402"
        print(f"engine  {found['engine']}\npath    {found['path']}\nsize    {found['size_bytes'] / 1e6:.2f} MB")
        print(f"schema  {found['schema_version']} of {found['current_version']} ({state})")
        print_table(["TABLE", "ROWS"], [[t, n] for t, n in found["rows"].items()])
    elif args.db_command == "migrate":
        print(f"{found['path']}: schema {found['from_version'] or 0} -> {found['to_version']}")
    else:
        removed = ", ".join(f"{n} {t}" for t, n in found["removed"].items())
        print(f"removed {found['total']} rows older than {args.older_than}: {removed}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    return run_async(_cache(args, settings_from(args)))


async def _cache(args: argparse.Namespace, settings) -> int:
    from .cache.semantic import SemanticCache

    if args.cache_command == "build":
        return await _cache_build(args, settings)
    async with open_service(settings, create=False) as service:
        store = service.store
        cache = SemanticCache.from_config(store, settings.cache)
        if args.cache_command == "clear":
            removed = await cache.clear(args.namespace)
            if args.json:
                print_json({"removed": removed, "namespace": args.namespace})
            else:
                print(f"removed {removed} cached answers" + (f" from {args.namespace!r}" if args.namespace else "")
                      + f" {written_to(settings)}")
            return 0
        await cache.ready()
        info = cache.info()
        info["namespaces"] = await store.fetchall(
            "SELECT namespace, COUNT(*) AS entries, SUM(hits) AS hits FROM semantic_cache GROUP BY namespace "
            "ORDER BY entries DESC"
        )
    if args.json:
        print_json(info)
    else:
        embedder = info["embedder"]
        if info["enabled"] and embedder is None:
            print("cache on: exact matches only until the static vectors are made (`p402 cache build`)")
        elif info["enabled"]:
            print(f"cache on: embedder {embedder['name']} ({embedder['label']}, {embedder['dim']} dims); "
                  f"threshold {info['threshold']:.2f}; ttl {info['ttl_s']:.0f}s; max {info['max_entries']} entries")
            if info["confirmer"] is not None:
                print(f"candidates at static cosine {info['candidate_threshold']:.2f} are confirmed by all-MiniLM-L6-v2")
        else:
            print("cache off (cache.enabled = false)")
        if info["warning"]:
            print(info["warning"])
        if info["namespaces"]:
            print()
            print_table(["NAMESPACE", "ENTRIES", "HITS"], [[n["namespace"], n["entries"], n["hits"]] for n in info["namespaces"]])
    return 0


async def _cache_build(args: argparse.Namespace, settings) -> int:
    """Make the default cache's static vectors now rather than in the background at first use."""
    import asyncio
    import threading
    import time

    from .cache.embedders import BuildStopped, plan_embedders

    started = time.perf_counter()
    plan = await asyncio.to_thread(plan_embedders, settings.cache.embedder, model_dir=settings.cache.model_dir)
    built = plan.build is not None
    stop = threading.Event()
    try:  # a SIGINT to this process alone (not its group) cancels here: the child stops between two batches
        embedder = await asyncio.to_thread(plan.build, stop=stop) if plan.build is not None else plan.embedder
    except asyncio.CancelledError:
        stop.set()
        raise
    except BuildStopped:
        print("p402: cache build: the build was stopped before it was done (its process was signalled)", file=sys.stderr)
        return 1
    result = {"embedder": embedder.info() if embedder is not None else None, "built": built,
              "seconds": round(time.perf_counter() - started, 1), "warning": plan.warning}  # fmt: skip
    if args.json:
        print_json(result)
    elif embedder is None or plan.confirmer is None:
        print(f"nothing to build: cache.embedder = {settings.cache.embedder!r} has no static stage"
              + (f" ({plan.warning})" if plan.warning else ""))
    else:
        print(f"{embedder.name}: " + (f"made in {result['seconds']} s" if built else "already made"))
    return 0


# --- the parser ----------------------------------------------------------------------------


def _common(default: Any = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", default=default, help="config file (default: the user config dir; or P402_CONFIG)"
    )
    return common


def _log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("text", "json"),
                   help="stderr log lines: text, or one JSON object a line (default [gateway] log_format; or P402_LOG_FORMAT)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="least severe record logged (default info; or P402_LOG_LEVEL)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request ([gateway] access_log = false)")


def build_parser() -> argparse.ArgumentParser:
    # A subcommand's own default would overwrite `p402 --config FILE COMMAND`'s file, so it sets none.
    common = _common(default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="p402",
        description="P402 Console: route, watch and price LLM traffic across 12 providers.",
        parents=[_common()],
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"p402 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("providers", parents=[common], help="list providers and whether they are configured")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_providers)

    p = sub.add_parser("doctor", parents=[common], help="check each configured provider's route, DNS, TCP, TLS and key")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--provider", action="append", metavar="ID", help="only this provider (repeatable)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("models", parents=[common], help="list models with prices and capabilities")
    p.add_argument("--provider", metavar="P", help="only this provider's models")
    p.add_argument("--capability", metavar="C", action="append", help="only models with this capability (repeatable)")
    p.add_argument("--max-tier", choices=["budget", "mid", "premium"], help="no tier above this")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("compare", parents=[common], help="what a call of a given size costs on every model")
    p.add_argument("--input-tokens", type=_token_count, default=COMPARE_INPUT_TOKENS, metavar="N",
                   help=f"prompt tokens of the call (default {COMPARE_INPUT_TOKENS:,})")
    p.add_argument("--output-tokens", type=_token_count, default=COMPARE_OUTPUT_TOKENS, metavar="M",
                   help=f"tokens of the answer (default {COMPARE_OUTPUT_TOKENS:,})")
    # As the gateway's cost comparison: an embedding model is no answer to a call that writes tokens.
    p.add_argument("--capability", metavar="C", action="append",
                   help="only models with this capability (repeatable; default: chat)")
    p.add_argument("--max-tier", choices=["budget", "mid", "premium"], help="no tier above this")
    p.add_argument("--top", type=_positive_int, metavar="K", help="only the K cheapest")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tokens", parents=[common], help="count tokens with tiktoken (offline)")
    p.add_argument("--model", metavar="ID", help="count with this model's tokenizer")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("text", metavar="TEXT", help="the text, or - to read stdin")
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("catalog", parents=[common], help="manage the model catalog")
    catalog_sub = p.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    q = catalog_sub.add_parser(
        "import", parents=[common],
        help="update prices and context windows from a LiteLLM price file, and add the chat models it prices that we lack",
    )
    q.add_argument("file", metavar="FILE", help="model_prices_and_context_window.json")
    q.add_argument("--provider", action="append", metavar="ID", help="only this provider's models (repeatable)")
    q.add_argument("--overrides", metavar="PATH", help="override file to write (default: user config dir)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_catalog_import)

    p = sub.add_parser(
        "chat",
        parents=[common],
        help="send one prompt: routed with failover, or to one --model",
        description="Send one prompt through the router (with failover), or straight to one --model.",
        epilog=_ROUTE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="ID", help="pin provider/model (as `p402 models` lists them): no routing, no failover")
    _add_route_flags(p)
    p.add_argument("--max-retries", type=_non_negative_int, metavar="N", help="fallbacks to try after a failure (default: config)")
    p.add_argument("--stream", action="store_true", help="stream the answer (JSON then includes ttft_ms)")
    p.add_argument("--json", action="store_true", help="print one JSON object: content, usage, cost, timing, attempts")
    p.add_argument("--system", metavar="S", help="a system prompt")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N", help="cap the answer's length")
    p.add_argument("--session", type=_label, metavar="ID", help="charge an agent session, by id or name (its budget is checked first)")
    p.add_argument("--tag", type=_label, metavar="T", help="a label for spend reports (p402 spend --by tag)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="answer from / keep in the semantic cache (default: config cache.enabled, on)")
    p.add_argument("--namespace", type=_label, metavar="N", help="cache namespace (default: the session, else 'default')")
    p.add_argument("--db", metavar="PATH|URL", help=DB_HELP)
    p.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read stdin")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "route",
        parents=[common],
        help="which model would answer a prompt, and why (a dry run: nothing is called)",
        description=(
            "A dry run of the router: the chosen model, its fallbacks, every candidate's scores\n"
            "and every excluded model with its reason. Only configured providers take part;\n"
            "--all routes over the whole catalog as if every provider were configured\n"
            "(to explore before adding keys)."
        ),
        epilog=_ROUTE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_route_flags(p)
    p.add_argument("--max-tokens", type=_positive_int, metavar="N", help="the answer's length cap (else the mode's default)")
    p.add_argument("--system", metavar="S", help="a system prompt (it counts towards the prompt's tokens)")
    p.add_argument("--all", action="store_true", help="count every catalog provider as configured")
    p.add_argument("--top", type=_positive_int, default=10, metavar="K", help="candidates shown in the table (default 10)")
    p.add_argument("--json", action="store_true", help="print the whole decision as JSON")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read stdin")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("sim", parents=[common], help="serve every provider's API on loopback: no keys, no network")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=4021, help="port (default 4021; 0 picks a free one)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated answers (default 0)")
    p.add_argument("--no-latency", action="store_true", help="answer at once instead of at each model's pace")
    p.add_argument("--speed", type=_positive_float, default=1.0, metavar="X", help="pace X times faster (default 1)")
    p.add_argument("--no-usage", action="store_true",
                   help="OpenAI-compatible providers report no usage, as some self-hosted servers do")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("demo", parents=[common], help="the console on simulated providers: no keys, no network")
    p.add_argument("--db", metavar="PATH", help="keep the simulated ledger in this file (default: a temporary one)")
    p.add_argument("--rate", type=_positive_float, default=3.0, metavar="N", help="requests per second, on average (default 3)")
    p.add_argument("--seed", type=int, help="seed for the traffic (default: different every run)")
    p.add_argument("--refresh", type=_positive_float, default=0.5, metavar="S", help="seconds between redraws (default 0.5)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("console", parents=[common], help="the live console (the default command)")
    p.add_argument("--db", metavar="PATH|URL", help=DB_HELP)
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve the gateway here, from the same process")
    p.add_argument("--attach", metavar="URL", help="watch a running gateway (p402 serve) instead of routing here")
    # From the environment by default: a key on the command line shows in `ps` and the shell's history.
    p.add_argument("--key", metavar="K", default=os.environ.get("P402_KEY") or None,
                   help="the gateway key for --attach (default: $P402_KEY; see p402 keys create)")
    p.add_argument("--sim", action="store_true",
                   help="route to simulated providers: no keys, no network (a temporary ledger unless --db)")
    p.add_argument("--refresh", type=_positive_float, default=0.5, metavar="S", help="seconds between redraws (default 0.5)")
    _log_flags(p)  # the --listen gateway's, written only when stderr is not the console's terminal
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("serve", parents=[common], help="the OpenAI-compatible gateway, headless")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; beyond loopback needs a gateway key)")
    p.add_argument("--port", type=_port, help="port (default 4020; 0 picks a free one)")
    p.add_argument("--db", metavar="PATH|URL", help=DB_HELP)
    p.add_argument("--sim", action="store_true", help="simulate every provider in-process: no keys, no network")
    p.add_argument("--workers", type=_workers, metavar="N",
                   help="processes serving the port, each a whole gateway (default 1; or [gateway] workers)")
    _log_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", parents=[common], help="gateway keys: create, list, show, update, revoke")
    keys_sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    keyed = argparse.ArgumentParser(add_help=False)
    keyed.add_argument("--db", metavar="PATH|URL", help=DB_HELP)
    keyed.add_argument("--json", action="store_true", help="print JSON")
    rules = argparse.ArgumentParser(add_help=False)
    rules.add_argument("--budget-usd", type=float, metavar="X", help="what the key may spend a period")
    rules.add_argument("--budget-period", choices=["day", "month", "total"], help="the budget's period (default month)")
    rules.add_argument("--rpm", type=_positive_int, metavar="N", help="requests a minute")
    rules.add_argument("--tpm", type=_positive_int, metavar="N", help="tokens a minute")
    rules.add_argument("--models", action="append", metavar="PATTERN", help="allowed models: openai/*, */llama-* (repeat)")
    rules.add_argument("--max-tier", choices=["budget", "mid", "premium"], help="no tier above this")
    rules.add_argument("--max-cost-usd", type=float, metavar="X", help="most a request may be estimated to cost")
    rules.add_argument("--redact", action="append", metavar="RULE",
                       help="email, phone, card, iban, secret, or NAME=REGEX (repeat)")
    rules.add_argument("--deny", action="append", metavar="REGEX", help="refuse requests matching it (repeat)")
    rules.add_argument("--mode", choices=["cost", "quality", "speed", "balanced", "adaptive"], help="default routing mode")
    rules.add_argument("--tag", help="default tag")
    rules.add_argument("--namespace", help="default cache namespace")
    rules.add_argument("--session-prefix", metavar="P", help="put before every session name the key sends")
    q = keys_sub.add_parser("create", parents=[common, keyed, rules],
                            help="make a key; it is printed once, only its hash is kept")
    q.add_argument("--name", required=True, metavar="N", help="who or what uses it")
    q.add_argument("--role", choices=["admin", "user", "viewer"], default="user", help="default user")
    keys_sub.add_parser("list", parents=[common, keyed], help="every key with its spend, without its secret")
    q = keys_sub.add_parser("show", parents=[common, keyed], help="one key: role, policy, spend against its budget")
    q.add_argument("id", metavar="ID", help="the key's id, as `p402 keys list` shows it")
    q = keys_sub.add_parser("update", parents=[common, keyed, rules],
                            help="change a key's name, role or policy; gateways apply it within a second")
    q.add_argument("id", metavar="ID", help="the key's id, as `p402 keys list` shows it")
    q.add_argument("--name", metavar="N", help="a new name")
    q.add_argument("--role", choices=["admin", "user", "viewer"])
    q.add_argument("--clear", action="append", metavar="FIELD", help="drop a policy field, e.g. rpm (repeat)")
    q = keys_sub.add_parser("revoke", parents=[common, keyed], help="stop a key from working")
    q.add_argument("id", metavar="ID", help="the key's id, as `p402 keys list` shows it")
    p.set_defaults(func=cmd_keys)

    db_help = DB_HELP
    period = argparse.ArgumentParser(add_help=False)
    period.add_argument("--period", metavar="P", help="today, 7d, 30d (default), all, or FROM..TO dates")
    period.add_argument("--from", dest="start", metavar="YYYY-MM-DD", help="first day (instead of --period)")
    period.add_argument("--to", dest="end", metavar="YYYY-MM-DD", help="last day, inclusive (instead of --period)")
    period.add_argument("--db", metavar="PATH|URL", help=db_help)
    period.add_argument("--include-simulated", action="store_true",
                        help="count requests the simulator answered too (left out by default)")
    period.add_argument("--json", action="store_true", help="print JSON")
    period.add_argument("--key", metavar="ID", help="only this gateway key's requests (its id or name)")

    p = sub.add_parser("spend", parents=[common, period], help="what was spent in a period, broken down")
    p.add_argument("--by", choices=["provider", "model", "session", "tag", "key", "day"], default="provider",
                   help="breakdown (default provider)")
    p.set_defaults(func=cmd_spend)

    p = sub.add_parser("recommendations", parents=[common, period], help="where the ledger says money or time goes to waste")
    p.set_defaults(func=cmd_recommendations)

    p = sub.add_parser("decisions", parents=[common], help="a routing decision as it was made")
    decisions_sub = p.add_subparsers(dest="decisions_command", metavar="ACTION", required=True)
    q = decisions_sub.add_parser("show", parents=[common], help="one decision: its ranking, scores and exclusions")
    q.add_argument("id", metavar="ID", help="a decision id (`decision_id` in a chat's --json)")
    q.add_argument("--db", metavar="PATH|URL", help=db_help)
    q.add_argument("--top", type=_positive_int, default=10, metavar="K", help="candidates shown in the table (default 10)")
    q.add_argument("--json", action="store_true", help="print the whole decision as JSON")
    q.set_defaults(func=cmd_decisions)

    p = sub.add_parser("sessions", parents=[common], help="agent sessions: budgets, spend, status")
    sessions_sub = p.add_subparsers(dest="sessions_command", metavar="ACTION", required=True)
    q = sessions_sub.add_parser("list", parents=[common], help="every session with its spend")
    q.add_argument("--status", choices=SESSION_STATUSES, help="only sessions with this status")
    q.add_argument("--key", metavar="ID", help="only sessions this gateway key sees: its own and the operator's")
    q = sessions_sub.add_parser("create", parents=[common], help="a new session")
    q.add_argument("--name", required=True, type=_session_name, metavar="N", help="what to call it")
    q.add_argument("--budget", type=_non_negative_float, metavar="USD", help="refuse requests past this spend")
    q.add_argument("--agent", type=_label, metavar="A", help="the agent working in it")
    q.add_argument("--metadata", metavar="JSON", help="a JSON object to keep with it")
    q = sessions_sub.add_parser("show", parents=[common], help="one session and its chat history")
    q.add_argument("id", metavar="ID", help="its id or name")
    q.add_argument("--messages", type=_positive_int, default=20, metavar="N", help="last N messages (default 20)")
    q = sessions_sub.add_parser("update", parents=[common], help="change name, budget, status, agent or metadata")
    q.add_argument("id", metavar="ID", help="its id or name")
    q.add_argument("--name", type=_session_name, metavar="N")
    q.add_argument("--budget", type=_non_negative_float, metavar="USD")
    q.add_argument("--no-budget", action="store_true", help="remove the budget")
    q.add_argument("--status", choices=SESSION_STATUSES)
    q.add_argument("--agent", type=_label, metavar="A")
    q.add_argument("--metadata", metavar="JSON", help="a JSON object (replaces the old one)")
    q = sessions_sub.add_parser("delete", parents=[common], help="delete a session (its ledger rows stay)")
    q.add_argument("id", metavar="ID", help="its id or name")
    for q in sessions_sub.choices.values():
        q.add_argument("--db", metavar="PATH|URL", help=db_help)
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("db", parents=[common], help="the store: status, migrate, prune old history")
    db_sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_sub.add_parser("status", parents=[common], help="engine, schema version, rows of the main tables, size")
    db_sub.add_parser("migrate", parents=[common], help="bring the store to this P402's schema")
    q = db_sub.add_parser("prune", parents=[common], help="delete ledger, decisions and health history older than AGE")
    q.add_argument("--older-than", required=True, metavar="AGE", help="30d, 12h, 90m, 2w (a bare number is days)")
    for q in db_sub.choices.values():
        q.add_argument("--db", metavar="PATH|URL", help=db_help)
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("cache", parents=[common], help="the semantic cache: which embedder, how full; clear it")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    cache_sub.add_parser("stats", parents=[common], help="embedder, threshold, entries per namespace")
    q = cache_sub.add_parser("clear", parents=[common], help="delete cached answers")
    q.add_argument("--namespace", metavar="N", help="only this namespace")
    cache_sub.add_parser("build", parents=[common], help="make the static vectors now (else: at first use)")
    for q in cache_sub.choices.values():
        q.add_argument("--db", metavar="PATH|URL", help=db_help)
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache)

    return parser


def _add_route_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["cost", "quality", "speed", "balanced", "adaptive"], help="how to rank models")
    p.add_argument("--require", metavar="C", action="append", help="a capability every candidate needs (repeatable)")
    p.add_argument("--prefer", metavar="P", action="append", help="try this provider first (repeatable)")
    p.add_argument("--exclude", metavar="P", action="append", help="never this provider (repeatable)")
    p.add_argument("--max-tier", choices=["budget", "mid", "premium"], help="no tier above this")
    p.add_argument("--max-cost", type=_non_negative_float, metavar="USD", help="no model estimated above this per request")


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes, not {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be from 1 to 64, not {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _label(text: str) -> str:
    from .core.hooks import MAX_LABEL_CHARS

    if len(text) > MAX_LABEL_CHARS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LABEL_CHARS} characters, not {len(text)}")
    return text


def _session_name(text: str) -> str:
    from .core.hooks import MAX_SESSION_NAME_CHARS

    if len(text) > MAX_SESSION_NAME_CHARS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SESSION_NAME_CHARS} characters, not {len(text)}")
    return text


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _token_count(text: str) -> int:
    from .core.costs import MAX_COMPARED_TOKENS

    value = _non_negative_int(text)
    if value > MAX_COMPARED_TOKENS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COMPARED_TOKENS:,}")
    return value


def run_async(coro) -> int:
    """Run a command's coroutine; Ctrl-C ends it quietly."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # plain `p402` opens the console
        args = parser.parse_args(["console", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args) or 0
    except P402Error as error:
        print(f"p402: {error.kind}: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        if os.environ.get("P402_DEBUG"):
            raise
        print(f"p402: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
