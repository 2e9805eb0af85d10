"""Typer groups whose first argument may be a subcommand or, failing that, belongs to a default one."""

from __future__ import annotations

from typer.core import TyperGroup


class DefaultCommandGroup(TyperGroup):
    """`lmkit data SOURCE` means `lmkit data build SOURCE`. With `options_to_default`, a leading option goes to
    the default command too (`lmkit eval --json RUN` means `lmkit eval run --json RUN`); help stays the group's."""

    default = "build"
    options_to_default = False

    def parse_args(self, ctx, args):
        first = args[0] if args else None
        if (first is not None and first not in self.commands and first not in ("-h", "--help")
                and (self.options_to_default or not first.startswith("-"))):
            args = [self.default, *args]
        return super().parse_args(ctx, args)
