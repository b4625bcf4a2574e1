"""The `litmus` command. Each top-level subcommand is a registrar in SUBCOMMANDS: a new area (e.g.
`litmus matrix`) adds one @subcommand function that builds its subparser, and no dispatch code changes."""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
SUBCOMMANDS: dict[str, Registrar] = {}


class CommandError(Exception):
    """A user mistake or an unavailable resource: printed as one line, exit status 1."""


def subcommand(name: str) -> Callable[[Registrar], Registrar]:
    def register(registrar: Registrar) -> Registrar:
        SUBCOMMANDS[name] = registrar
        return registrar

    return register


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CommandError as exc:
        print(f"litmus: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litmus", description="Litmus: LLM inference engine and model checks")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for registrar in SUBCOMMANDS.values():
        registrar(commands)
    return parser


@subcommand("zoo")
def _register_zoo(commands) -> None:
    zoo = commands.add_parser("zoo", help="models available without a hub (bundled real + tiny synthetic)")
    actions = zoo.add_subparsers(title="zoo commands", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list zoo models and whether they are built")
    listing.set_defaults(run=_zoo_list)
    build = actions.add_parser("build", help="build zoo models into the cache (all if none named)")
    build.add_argument("names", nargs="*", metavar="NAME")
    build.add_argument("--force", action="store_true", help="rebuild even if already built")
    build.set_defaults(run=_zoo_build)
    path = actions.add_parser("path", help="print a model's directory, building it if needed")
    path.add_argument("name", metavar="NAME")
    path.set_defaults(run=_zoo_path)


def _zoo_list(args: argparse.Namespace) -> int:
    from harness import zoo

    rows = [("NAME", "ARCHITECTURE", "KIND", "PATH")]
    for spec in zoo.list_specs():
        rows.append((spec.name, spec.architecture, spec.kind, _built_status(spec.name)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])
    return 0


def _built_status(name: str) -> str:
    from harness import zoo

    try:
        path = zoo.built_path(name)
    except zoo.ZooUnavailableError as exc:
        return f"(unavailable: {exc})"
    return str(path) if path else "(not built)"


def _zoo_build(args: argparse.Namespace) -> int:
    from harness import zoo

    _check_names(args.names)
    for name in args.names or [spec.name for spec in zoo.list_specs()]:
        with _zoo_errors():
            print(zoo.build([name], force=args.force)[0])
    return 0


def _zoo_path(args: argparse.Namespace) -> int:
    from harness import zoo

    _check_names([args.name])
    # Scripts capture this command's stdout as the path, so library chatter goes to stderr.
    with _zoo_errors(), contextlib.redirect_stdout(sys.stderr):
        path = zoo.model_path(args.name)
    print(path)
    return 0


def _check_names(names: list[str]) -> None:
    from harness import zoo

    for name in names:
        try:
            zoo.get_spec(name)
        except zoo.UnknownModelError as exc:
            raise CommandError(str(exc)) from None


@contextlib.contextmanager
def _zoo_errors():
    from harness import zoo

    try:
        yield
    except zoo.ZooUnavailableError as exc:
        raise CommandError(str(exc)) from None


@subcommand("matrix")
def _register_matrix(commands) -> None:
    from harness.matrix import register_matrix_cli

    register_matrix_cli(commands)


@subcommand("docs")
def _register_docs(commands) -> None:
    from harness.docs import register_docs_cli

    register_docs_cli(commands)


@subcommand("serve")
def _register_serve(commands) -> None:
    from engine.entrypoints.cli import add_serve_parser

    add_serve_parser(commands)


@subcommand("report")
def _register_report(commands) -> None:
    from harness.community import register_report_cli

    register_report_cli(commands)


@subcommand("golden")
def _register_golden(commands) -> None:
    from harness.golden import register_golden_cli

    register_golden_cli(commands)


@subcommand("bench")
def _register_bench(commands) -> None:
    from harness.bench import register_bench_cli

    register_bench_cli(commands)


@subcommand("selftest")
def _register_selftest(commands) -> None:
    from harness.selftest import register_selftest_cli

    register_selftest_cli(commands)


@subcommand("diff-layers")
def _register_diff_layers(commands) -> None:
    from harness.diff_layers import register_diff_layers_cli

    register_diff_layers_cli(commands)
