"""jobctl, the command line of jobd. Thin: every request goes through jobd.client.

Human output goes through rich; ``--json`` prints the daemon's result as is,
for scripts. Expected errors (daemon not running, a refused request) are one
red line on stderr with the hint, never a traceback; with ``--json`` also one
``{"error": {"code", "message", "hint"}}`` object on stdout.

What a submission carries (names, commands, tags, error strings) is shown with
its control characters escaped (``jobd.cli_text.clean``): a run must not move the
operator's cursor or rewrite their terminal. Only ``jobctl logs`` writes output
raw, like cat.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobd import __version__
from jobd.cli_text import (
    cell,
    check_utf8,
    clean,
    is_utf8,
    json_safe,
    parse_run_id,
    parse_timeout,
    strict_json,
)
from jobd.client import Client, default_socket_path
from jobd.core.model import PRIORITIES, TERMINAL, priority_name, priority_value
from jobd.errors import (
    ClientError,
    ConnectionLost,
    DaemonNotRunning,
    RemoteError,
    RequestTooLarge,
)

EXIT_ERROR = 1  # the daemon refused or failed a request, or a waited run did not succeed
# The daemon could not be reached or went away (any ClientError but RemoteError),
# forbidden by its access rules; also click's code for usage errors.
EXIT_UNREACHABLE = 2
EXIT_TIMEOUT = 124  # `wait --timeout` ran out, as timeout(1)
EXIT_CANCELLED = 130  # the waited run was cancelled, or Ctrl-C (128 + SIGINT, as a shell)

EXIT_CODES_HELP = (
    f"Exit codes: 0 success; {EXIT_ERROR} the daemon refused a request, or a waited run did"
    f" not succeed; {EXIT_UNREACHABLE} cannot reach the daemon or lost the connection to it"
    " (not running, stopped or restarted, socket permission denied), forbidden by its access"
    f" rules, or bad usage; {EXIT_TIMEOUT} `wait` timed out; {EXIT_CANCELLED} the waited run"
    " was cancelled, or jobctl was interrupted."
)

STATE_STYLES = {
    "queued": "cyan",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "red",
    "dead": "bold red",
    "cancelled": "magenta",
    "skipped": "dim",
    "waiting": "yellow",
    "scheduled": "yellow",
    "retrying": "yellow",
}

app = typer.Typer(
    name="jobctl",
    help=f"Control jobd, the job scheduler daemon of this host.\n\n{EXIT_CODES_HELP}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a bug's traceback must not dump env values
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the raw JSON result.")]


@dataclass(frozen=True, slots=True)
class Options:
    """The global options, kept in the click context."""

    socket: str
    json: bool


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jobctl {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    socket: Annotated[
        str | None,
        typer.Option(
            "--socket",
            metavar="PATH",
            help="The daemon's socket \\[default: $JOBD_SOCKET, else ./.jobd/jobd.sock if it"
            " exists, else /run/jobd/jobd.sock].",
            show_default=False,
        ),
    ] = None,
    json_: JsonFlag = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    ctx.obj = Options(socket or default_socket_path(), json_)


def _opts(ctx: typer.Context, json_: bool) -> Options:
    """The global options, with a command's own ``--json`` folded in."""
    opts: Options = ctx.find_root().obj
    return Options(opts.socket, opts.json or json_)


# -- talking to the daemon --------------------------------------------------


@contextlib.contextmanager
def _connect(opts: Options) -> Iterator[Client]:
    """A client for one command; turns expected errors into a red line and an exit code."""
    try:
        with Client(opts.socket) as client:
            yield client
    except RemoteError as exc:  # the daemon answered, with an error
        _fail(opts, exc, EXIT_UNREACHABLE if exc.code == "forbidden" else EXIT_ERROR)
    except ClientError as exc:  # it could not be reached, or went away (stopped, restarted)
        _fail(opts, exc, EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_CANCELLED) from None


def _error_code(exc: ClientError) -> str:
    """The daemon's error code (docs/protocol.md), else a stable one for jobctl's side."""
    if isinstance(exc, RemoteError):
        return exc.code
    if isinstance(exc, DaemonNotRunning):
        return "not_running"
    if isinstance(exc, ConnectionLost):
        return "connection_lost"
    if isinstance(exc, RequestTooLarge):
        return "too_large"
    return "client_error"  # cannot connect (permission denied, …) or send the request


def _you() -> str:
    """Who the daemon sees: the effective uid (SO_PEERCRED), with its name if it has one."""
    uid = os.geteuid()
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _fail(opts: Options, exc: ClientError, code: int) -> NoReturn:
    error_code = _error_code(exc)
    hint = exc.hint
    if error_code == "forbidden":
        # The daemon names the protocol method; who is asking is what an admin needs to know.
        hint = f"you are {_you()}; {hint or 'an admin can grant roles in [access] of jobd.toml'}"
    if opts.json:
        error = {"code": error_code, "message": json_safe(exc.message), "hint": json_safe(hint)}
        typer.echo(json.dumps({"error": error}, ensure_ascii=False))
    err.print(Text(f"jobctl: {clean(exc.message)}", style="bold red"), soft_wrap=True)
    if hint:
        err.print(Text(f"  hint: {clean(hint)}"), soft_wrap=True)
    raise typer.Exit(code)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


# -- submit -----------------------------------------------------------------


def _json_or_text(value: str) -> Any:
    try:
        return strict_json(value, "--arg")
    except ValueError:
        return value


def _submission(
    command: list[str],
    shell: str | None,
    call: str | None,
    args: list[str],
    kwargs: str | None,
) -> dict[str, Any]:
    """The what-to-run half of a submission: exactly one of command, shell, call."""
    given = [bool(command), shell is not None, call is not None]
    if given.count(True) != 1:
        raise typer.BadParameter(
            "give exactly one of: a command after `--`, --shell LINE, or --call MOD:FUNC"
        )
    if (args or kwargs is not None) and call is None:
        raise typer.BadParameter("--arg and --kwargs go with --call", param_hint="--arg")
    if shell is not None:
        return {"shell": shell}
    if call is None:
        return {"command": command}
    fields: dict[str, Any] = {"call": call, "args": [_json_or_text(a) for a in args]}
    if kwargs is not None:
        try:
            fields["kwargs"] = strict_json(kwargs, "--kwargs")
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--kwargs") from None
        if not isinstance(fields["kwargs"], dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--kwargs")
    return fields


def _env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected K=V, got {pair!r}", param_hint="--env")
        env[key] = value
    return env


def _abspath(cwd: str) -> str:
    path = os.path.abspath(cwd)  # the daemon has another cwd
    if not is_utf8(path):  # jobctl's own cwd is not UTF-8
        raise typer.BadParameter(
            f"{clean(path)} is not valid UTF-8: jobd takes UTF-8 text", param_hint="--cwd"
        )
    return path


def _priority(value: str) -> int:
    try:
        return priority_value(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--priority") from None


@app.command(
    context_settings={"allow_interspersed_args": False},
    epilog="Prints the new run's id, so that `id=$(jobctl submit -- make test)` works.",
)
def submit(
    ctx: typer.Context,
    *,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="COMMAND",
            help="The argv to run, no shell (after `--` if it has options).",
            show_default=False,
            callback=check_utf8,
        ),
    ] = None,
    shell: Annotated[
        str | None,
        typer.Option(
            metavar="LINE", help="Run a line with /bin/sh -c instead.", callback=check_utf8
        ),
    ] = None,
    call: Annotated[
        str | None,
        typer.Option(
            metavar="MOD:FUNC",
            help="Run a Python callable instead, in a thread pool (admins only).",
            callback=check_utf8,
        ),
    ] = None,
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg",
            metavar="JSON",
            help="An argument of --call (JSON, else text).",
            callback=check_utf8,
        ),
    ] = None,
    kwargs: Annotated[
        str | None,
        typer.Option(
            metavar="JSON", help="Keyword arguments of --call (object).", callback=check_utf8
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool", "-p", help="The pool to run in \\[default: default].", callback=check_utf8
        ),
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option(help=f"{', '.join(PRIORITIES)} or an integer \\[default: normal]."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="A name for the run.", callback=check_utf8)
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="A tag (repeat).", callback=check_utf8)
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            metavar="K=V",
            help="An environment variable (repeat).",
            callback=check_utf8,
        ),
    ] = None,
    cwd: Annotated[
        str | None, typer.Option(metavar="DIR", help="Working directory.", callback=check_utf8)
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", "-w", help="Wait for the run and exit with its code (see wait)."),
    ] = False,
    json_: JsonFlag = False,
) -> None:
    """Submit a command, a shell line or a Python callable."""
    opts = _opts(ctx, json_)
    fields = _submission(command or [], shell, call, arg or [], kwargs)
    options = {
        "pool": pool,
        "priority": None if priority is None else _priority(priority),
        "name": name,
        "tags": tag or None,
        "env": _env(env) if env else None,
        "cwd": None if cwd is None else _abspath(cwd),
    }
    fields.update({k: v for k, v in options.items() if v is not None})
    with _connect(opts) as client:
        result = client.call("submit", fields)
        if not opts.json:
            typer.echo(result["id"])  # at once, even with --wait
        elif not wait:
            _print_json(result)
        if not wait:
            return
        done = client.wait([result["id"]])
    if opts.json:
        _print_json(done["runs"][0])  # one document: the run's final summary
    raise typer.Exit(_wait_exit_code(done))


# -- ls, show ---------------------------------------------------------------


def _state(state: str) -> Text:
    return cell(state, STATE_STYLES.get(state, ""))


def _what(run: dict[str, Any]) -> str:
    """The run's name, else what it runs."""
    if run.get("name"):
        return str(run["name"])
    if run.get("kind") == "shell":
        return str(run.get("shell", ""))
    if run.get("kind") == "call":
        args = [json.dumps(a) for a in run.get("args", [])]
        args += [f"{k}={json.dumps(v)}" for k, v in run.get("kwargs", {}).items()]
        return f"{run.get('call', '')}({', '.join(args)})"
    return shlex.join(run.get("command", []))


def _duration(seconds: float) -> str:
    """Roughly, in the largest unit: 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(seconds, 0))}s"


def _age(timestamp: float | None) -> str:
    return "" if timestamp is None else _duration(time.time() - timestamp)


def _took(started: float | None, ended: float | None) -> str:
    if started is None:
        return "-"
    seconds = (time.time() if ended is None else ended) - started
    return f"{seconds:.3f}s" if seconds < 60 else _duration(seconds)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _table(
    columns: tuple[str, ...],
    *,
    right: tuple[str, ...] = (),
    flexible: tuple[str, ...] = (),
    title: str | None = None,
) -> Table:
    """A borderless table; only ``flexible`` columns give way when the terminal is narrow."""
    table = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in right else "left",
            no_wrap=column not in flexible,
            overflow="fold",
        )
    return table


def _text(value: Any) -> Text:
    return cell("-" if value is None else value)


@app.command("ls")
def list_runs(
    ctx: typer.Context,
    *,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", "-s", help="Only this state (repeat).", callback=check_utf8),
    ] = None,
    pool: Annotated[
        str | None, typer.Option("--pool", "-p", help="Only this pool.", callback=check_utf8)
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Only runs of this name.", callback=check_utf8)
    ] = None,
    tag: Annotated[
        str | None,
        typer.Option("--tag", "-t", help="Only runs with this tag.", callback=check_utf8),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Runs to show (newest).")] = 50,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Every matching run.")] = False,
    json_: JsonFlag = False,
) -> None:
    """List runs, newest first."""
    opts = _opts(ctx, json_)
    filters = {"state": state or None, "pool": pool, "name": name, "tag": tag}
    with _connect(opts) as client:
        page: dict[str, Any]
        if all_:
            page = {"runs": list(client.iter_runs(**filters)), "next_cursor": None}
        else:
            page = client.list(limit=limit, **filters)
    if opts.json:
        _print_json(page)
        return
    table = _table(
        ("ID", "STATE", "POOL", "PRIO", "NAME / COMMAND", "TRIES", "EXIT", "AGE"),
        right=("ID", "TRIES", "EXIT", "AGE"),
        flexible=("NAME / COMMAND",),
    )
    for run in page["runs"]:
        table.add_row(
            cell(run["id"]),
            _state(run["state"]),
            cell(run.get("pool", "")),
            cell(priority_name(run.get("priority", 0))),
            Text(clean(_what(run)), no_wrap=True, overflow="ellipsis"),  # one line per run
            cell(run.get("attempts", 0)),
            cell("" if run.get("exit_code") is None else run["exit_code"]),
            cell(_age(run.get("submitted_at"))),
        )
    if page["runs"]:
        out.print(table)
    else:
        err.print("no runs")
    if page.get("next_cursor"):
        err.print(Text("(more runs: --limit N or --all)", style="dim"))


RunId = Annotated[int, typer.Argument(metavar="ID", parser=parse_run_id, show_default=False)]
RunIds = Annotated[
    list[int], typer.Argument(metavar="ID...", parser=parse_run_id, show_default=False)
]
# So that `-1` reaches parse_run_id ("ID must be a positive run id") instead of click's
# "No such option: -1"; parse_run_id reports other unknown options itself.
IDS_AS_ARGUMENTS = {"ignore_unknown_options": True}


@app.command(context_settings=IDS_AS_ARGUMENTS)
def show(
    ctx: typer.Context,
    *,
    run_id: RunId,
    json_: JsonFlag = False,
) -> None:
    """Show every field of a run and its attempts."""
    opts = _opts(ctx, json_)
    with _connect(opts) as client:
        run = client.get(run_id)
    if opts.json:
        _print_json(run)
        return
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    rows: list[tuple[str, object]] = [
        ("id", run["id"]),
        ("name", _text(run.get("name"))),
        ("state", _state(run["state"])),
        ("reason", _text(run.get("reason"))),
        ("pool", run.get("pool", "")),
        ("priority", f"{priority_name(run.get('priority', 0))} ({run.get('priority', 0)})"),
        (run.get("kind", "command"), _what({**run, "name": None})),
        ("cwd", _text(run.get("cwd"))),
        ("env", " ".join(f"{k}={shlex.quote(v)}" for k, v in run.get("env", {}).items()) or "-"),
        ("tags", ", ".join(run.get("tags", [])) or "-"),
        ("owner", f"uid {run.get('owner')}"),
        ("submitted", f"{_when(run.get('submitted_at'))} ({_age(run.get('submitted_at'))} ago)"),
        ("updated", _when(run.get("updated_at"))),
        ("attempts", f"{run.get('attempts', 0)} ({run.get('lost', 0)} lost)"),
        ("exit code", _text(run.get("exit_code"))),
    ]
    for key, value in rows:
        fields.add_row(cell(key), value if isinstance(value, Text) else cell(value))
    out.print(fields)
    attempts = run.get("attempt_list", [])
    if not attempts:
        return
    table = _table(
        ("#", "STARTED", "TOOK", "OUTCOME", "EXIT", "PID", "ERROR", "OUTPUT"),
        right=("#", "TOOK", "EXIT", "PID"),
        flexible=("ERROR", "OUTPUT"),
        title="attempts",
    )
    for attempt in attempts:
        table.add_row(
            cell(attempt.get("attempt")),
            cell(_when(attempt.get("started_at"))),
            cell(_took(attempt.get("started_at"), attempt.get("ended_at"))),
            _state(attempt.get("outcome") or "running"),
            _text(attempt.get("exit_code")),
            _text(attempt.get("pid")),
            _text(attempt.get("error")),
            _text(attempt.get("output")),
        )
    out.print()
    out.print(table)


# -- cancel, logs, wait -----------------------------------------------------


@app.command(
    epilog="Exits 1 if any run was not found or is not yours to cancel.",
    context_settings=IDS_AS_ARGUMENTS,
)
def cancel(
    ctx: typer.Context,
    *,
    run_ids: RunIds,
    json_: JsonFlag = False,
) -> None:
    """Cancel runs: queued ones at once, running ones get SIGTERM (then SIGKILL)."""
    opts = _opts(ctx, json_)
    with _connect(opts) as client:
        result = client.cancel(run_ids)
    outcomes: dict[str, str] = result["results"]
    if opts.json:
        _print_json(result)
    else:
        for run_id, outcome in outcomes.items():
            style = "red" if outcome in ("not_found", "forbidden") else ""
            out.print(Text.assemble(cell(run_id), " ", cell(outcome, style)))
    if any(o in ("not_found", "forbidden") for o in outcomes.values()):
        raise typer.Exit(EXIT_ERROR)


@app.command(context_settings=IDS_AS_ARGUMENTS)
def logs(
    ctx: typer.Context,
    *,
    run_id: RunId,
    attempt: Annotated[
        int | None, typer.Option(min=1, help="Attempt number \\[default: the latest].")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")
    ] = False,
    json_: JsonFlag = False,
) -> None:
    """Write a run's captured output (stdout and stderr interleaved) as it arrives.

    With --json, one {"data": ...} object per line.
    """
    opts = _opts(ctx, json_)
    note = None
    with _connect(opts) as client:
        empty = True
        for chunk in client.logs(run_id, attempt=attempt, follow=follow):
            empty = False
            if opts.json:
                sys.stdout.write(json.dumps({"data": chunk}, ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(chunk)
            sys.stdout.flush()
        if empty and not follow:
            # Nothing, and exit 0: say whether the run has simply not started yet.
            # (Without follow, the daemon answers such a run with attempt null.)
            note = _no_output_note(client.get(run_id), attempt)
    if note:
        err.print(Text(note, style="yellow"), soft_wrap=True)


def _no_output_note(run: dict[str, Any], attempt: int | None) -> str | None:
    """Why ``jobctl logs`` printed nothing, when it is not an empty output."""
    started = [a.get("attempt") for a in run.get("attempt_list", [])]
    if (attempt in started) if attempt is not None else bool(started):
        return None  # an attempt that has written nothing (yet)
    what = f"run {run['id']}" if attempt is None else f"attempt {attempt} of run {run['id']}"
    state = clean(run.get("state"))
    if state in TERMINAL:
        return f"{what} never started ({state}): it has no output"
    return f"{what} has not started yet ({state}); use -f to follow its output"


def _wait_exit_code(result: dict[str, Any]) -> int:
    if result.get("timed_out"):
        return EXIT_TIMEOUT
    runs: list[dict[str, Any]] = result["runs"]
    if len(runs) != 1:
        return 0 if all(run["state"] == "succeeded" for run in runs) else EXIT_ERROR
    run = runs[0]
    if run["state"] == "succeeded":
        return 0
    if run["state"] == "cancelled":
        return EXIT_CANCELLED
    code = run.get("exit_code")
    # A signal is already 128 + N; a failure without a status (a raising callable) is 1.
    return code if isinstance(code, int) and 0 < code < 256 else EXIT_ERROR


@app.command(
    epilog=(
        "Exit code with one run: its exit status (0 when it succeeded; 128+N when killed by"
        f" signal N; {EXIT_ERROR} when it failed without one, e.g. a raising callable;"
        f" {EXIT_CANCELLED} when cancelled). With several runs: 0 if all succeeded, else"
        f" {EXIT_ERROR}. {EXIT_TIMEOUT} when --timeout runs out first. {EXIT_UNREACHABLE} when"
        " the daemon cannot be reached, or the connection to it is lost while waiting (it"
        " stopped or restarted): the run's outcome is unknown, wait again. A run's own exit"
        ' status can be 2 too: with --json, such an error is an {"error": ...} object.'
    ),
    context_settings=IDS_AS_ARGUMENTS,
)
def wait(
    ctx: typer.Context,
    *,
    run_ids: RunIds,
    timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Give up after this long (inf: never).", callback=parse_timeout
        ),
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Wait until every run is finished."""
    opts = _opts(ctx, json_)
    with _connect(opts) as client:
        result = client.wait(run_ids, timeout=timeout)
    if opts.json:
        _print_json(result)
    else:
        for run in result["runs"]:
            line = Text.assemble(cell(run["id"]), " ", _state(run["state"]))
            if run.get("exit_code") is not None:
                line.append(f" exit {clean(run['exit_code'])}")
            if run.get("reason"):
                line.append(f" ({clean(run['reason'])})", style="dim")
            out.print(line)
        if result.get("timed_out"):
            err.print(Text(f"timed out after {timeout:g}s", style="yellow"))
    raise typer.Exit(_wait_exit_code(result))


# -- status -----------------------------------------------------------------


@app.command(epilog=f"Exits {EXIT_ERROR} if the daemon reports itself unhealthy.")
def status(ctx: typer.Context, json_: JsonFlag = False) -> None:
    """Show the daemon, its pools, runs per state and the journal's health."""
    opts = _opts(ctx, json_)
    with _connect(opts) as client:
        stats = client.stats()
        hello = client.server_info
    daemon = stats["daemon"]
    healthy = bool(daemon.get("healthy", True))
    if opts.json:
        _print_json(stats)
        raise typer.Exit(0 if healthy else EXIT_ERROR)
    health = Text("healthy", style="green") if healthy else Text("UNHEALTHY", style="bold red")
    out.print(
        Text.assemble(
            (f"jobd {daemon.get('version')}", "bold"),
            f"  pid {daemon.get('pid')}  uid {daemon.get('uid')}",
            f"  up {_age(daemon.get('started_at'))}  ",
            health,
        )
    )
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("socket", _text(daemon.get("socket")))
    info.add_row(
        "journal", cell(f"{daemon.get('journal')} (synchronous={daemon.get('synchronous')})")
    )
    info.add_row("logs", _text(daemon.get("log_dir")))
    info.add_row("you", cell(f"{_you()}, roles: {', '.join(hello.get('roles', [])) or '-'}"))
    if daemon.get("last_error"):
        info.add_row("last error", cell(daemon["last_error"], "red"))
    out.print(info)

    pools = _table(
        ("POOL", "KIND", "WORKERS", "QUEUED", "RUNNING", "HELD"),
        right=("WORKERS", "QUEUED", "RUNNING", "HELD"),
        flexible=("POOL",),
        title="pools",
    )
    for pool in stats.get("pools", []):
        name = pool["name"] if pool.get("configured", True) else f"{pool['name']} (unconfigured)"
        pools.add_row(
            cell(name),
            _text(pool.get("kind")),
            *(cell(pool.get(k, 0)) for k in ("workers", "queued", "running", "held")),
        )
    out.print()
    out.print(pools)

    states = stats.get("states", {})
    line = Text("runs: ", style="bold")
    for i, (state, count) in enumerate(sorted(states.items(), key=lambda kv: kv[0])):
        line.append(", " if i else "")
        line.append(f"{count} ")
        line.append(_state(state))
    out.print()
    out.print(line if states else Text("runs: none", style="bold"))

    journal = stats.get("journal", {})
    failed = journal.get("failed_commits", 0)
    out.print(
        Text.assemble(
            ("journal: ", "bold"),
            f"{journal.get('commits', 0)} commits, {journal.get('effects', 0)} changes,"
            f" largest batch {journal.get('largest_batch', 0)}, ",
            (f"{failed} failed commits", "red" if failed else ""),
        )
    )
    if not healthy:
        raise typer.Exit(EXIT_ERROR)


def main() -> None:
    app(prog_name="jobctl")


if __name__ == "__main__":
    main()
