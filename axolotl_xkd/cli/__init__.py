"""`axolotl xkd ...`: the plugin's commands, contributed to Axolotl's CLI through the
`axolotl.cli_commands` entry point group. Each subcommand lives in its own module and is imported
only when it runs, so `axolotl --help` stays fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import click

# name -> "module:attribute" of a click command
SUBCOMMANDS: dict[str, str] = {
    "score": "axolotl_xkd.cli.score:score",
    "precompute": "axolotl_xkd.cli.precompute:precompute",
    "serve-teacher": "axolotl_xkd.cli.serve_teacher:serve_teacher",
    "plot": "axolotl_xkd.cli.plot:plot",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=_LazyGroup)
def xkd() -> None:
    """X-KD distillation tools (axolotl_xkd)."""


def checked(check: Callable[[str, str], None], value: str, key: str) -> None:
    """Run a check that names `key` in its ValueError (`locations.check_model_location`, `args.check_base_url`) on
    a command's argument, as a usage error: the message, without a traceback, before any work."""
    try:
        check(value, key)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
