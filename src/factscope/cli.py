"""The ``factscope`` command line.

``main`` is the click group (entry point ``factscope.cli:main``). Analysis commands are
registered lazily (see the block near the end of this file): their modules are imported only
when the command runs or its own ``--help`` is shown, so ``factscope --help`` stays fast and a
broken analysis import does not break the other commands.

Errors: a ``FactscopeError`` (bad input, existing output directory, ...) prints
``error: <message>`` to stderr and exits with status 2, without a traceback. Set
``FACTSCOPE_DEBUG=1`` to get the traceback anyway.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from pathlib import Path

import click

from factscope import __version__
from factscope.commands import CommandGroup
from factscope.errors import FactscopeError

# The CLI never shows windows: make sure matplotlib (if an analysis imports pyplot) uses Agg.
os.environ.setdefault("MPLBACKEND", "Agg")

ERROR_EXIT_CODE = 2


def _debug() -> bool:
    return os.environ.get("FACTSCOPE_DEBUG", "").strip() not in ("", "0", "false", "no")


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(ERROR_EXIT_CODE)


class _Unavailable(click.Command):
    """Stands in for a command whose module failed to import."""

    def __init__(self, name: str, target: str, exc: BaseException):
        self._message = f"the '{name}' command is unavailable: importing {target} failed: {type(exc).__name__}: {exc}"
        super().__init__(name, help=self._message, short_help="(unavailable: import failed)",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})

    def invoke(self, ctx: click.Context):
        raise FactscopeError(self._message)


class FactscopeGroup(CommandGroup):
    """A click group with lazily imported subcommands and clean error reporting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, tuple[str, str]] = {}

    # ---- lazy commands -----------------------------------------------------------------------

    def add_lazy_command(self, name: str, target: str, short_help: str = "") -> None:
        """Register ``target`` ("package.module:attribute", a click command or group) as
        ``factscope NAME``; it is imported only when used."""
        if ":" not in target:
            raise ValueError(f"lazy command target must be 'module:attribute', not {target!r}")
        self._lazy[name] = (target, short_help)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in self._lazy:
            return cmd
        target, _ = self._lazy[cmd_name]
        module_name, attr = target.split(":", 1)
        try:
            cmd = getattr(importlib.import_module(module_name), attr)
        except Exception as e:  # noqa: BLE001 - any import failure makes just this command unavailable
            if _debug():
                raise
            return _Unavailable(cmd_name, target, e)
        if not isinstance(cmd, click.Command):
            return _Unavailable(cmd_name, target, TypeError(f"{target} is not a click command"))
        return cmd

    def command_help(self, ctx: click.Context, name: str) -> str | None:
        # lazy commands show their registered help without being imported
        if name in self._lazy and name not in self.commands:
            return self._lazy[name][1]
        return super().command_help(ctx, name)

    # ---- errors ------------------------------------------------------------------------------

    def invoke(self, ctx: click.Context):
        from factscope.runs import discard_unstarted_runs, forget_unstarted_runs, unstarted_mark

        def _term(signum, frame):  # SIGTERM (kill, a batch system's time limit) acts as Ctrl-C
            raise KeyboardInterrupt

        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, _term)
        mark = unstarted_mark()  # (runs a Python caller started before are not this command's)
        try:
            result = super().invoke(ctx)
            forget_unstarted_runs(mark)
            return result
        except BaseException:
            # a failed command leaves no run directory without results behind, so the corrected
            # command is not refused with "already exists" or "config differs"
            discard_unstarted_runs(mark)
            try:
                raise
            except KeyboardInterrupt:
                if _debug():
                    raise
                click.echo(
                    "\ninterrupted. Results already written are kept; to continue a run, repeat the "
                    "same command with --resume.",
                    err=True,
                )
                ctx.exit(130)
            except FactscopeError as e:
                if _debug():
                    raise
                _fail(ctx, str(e))
            except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
                # a path the user gave us; name it rather than showing a traceback
                if _debug():
                    raise
                what = e.strerror or type(e).__name__
                _fail(ctx, f"{what}: {e.filename}" if e.filename else str(e))
            except OSError as e:
                import errno

                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and not _debug():
                    _fail(ctx, f"{e.strerror}: {e.filename}" if e.filename else str(e))
                raise


@click.group(cls=FactscopeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="factscope")
def main() -> None:
    """factscope: see how transformer language models recall facts.

    Every analysis command takes --out DIR and writes config.json, summary.json, result
    tables (CSV), figures (PNG) and a self-contained report.html into DIR.
    """


@main.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--title", default=None, help="Report title (default: from the run's config).")
@click.option("--static", is_flag=True, help="PNG figures only (no interactive figures, no JavaScript).")
@click.option("--open", "open_", is_flag=True, help="Open the report in the web browser afterwards.")
@click.option("--compare", "compare", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one page comparing the runs side by side (claims, findings, numbers) to this file.")
def report_command(dirs: tuple[Path, ...], title: str | None, static: bool, open_: bool, compare: Path | None) -> None:
    """Re-render DIR/report.html from the result files of each run DIR (or, with --compare FILE,
    one page comparing the runs side by side, e.g. two models)."""
    from factscope.runs import Run, atomic_write_text

    runs = [Run.open(d) for d in dirs]  # check every DIR before writing anything
    if compare is not None:
        from factscope.report import render_comparison

        if len(runs) < 2:
            raise click.UsageError("--compare needs at least two run directories")
        paths = [atomic_write_text(compare, render_comparison(runs))]
    else:
        paths = [run.write_report(title=title, static=static) for run in runs]
    for path in paths:
        click.echo(str(path))
        if open_:
            import webbrowser

            webbrowser.open(path.resolve().as_uri())


# ============================================================================================
# Analysis commands. One line per command or group, "module:attribute" imported only when used:
#
#   main.add_lazy_command("flow", "factscope.flow.cli:flow", "Information flow (Geva et al. 2023).")
#
# Keep the short help here in sync with the command's docstring (it is shown by `factscope --help`
# without importing the module).
# --------------------------------------------------------------------------------------------
# (add lines below)
main.add_lazy_command("flow", "factscope.flow.cli:flow", "Information flow and attribute extraction (Geva et al. 2023).")
main.add_lazy_command("hijack", "factscope.hijack.cli:hijack", "Context hijacking benchmark (Jiang et al. 2024, sec. 3).")
main.add_lazy_command("lca", "factscope.lca.cli:lca", "Latent concept association: synthetic task and one-layer transformer (Jiang et al. 2024, sec. 4-6).")
main.add_lazy_command("circuit", "factscope.circuits.cli:circuit", "Knowledge circuits: discover and evaluate edge-level circuits (Yao et al. 2024).")
main.add_lazy_command("trace", "factscope.trace.cli:trace", "Causal tracing: corrupt the subject, restore states, average indirect effects (Meng et al. 2022).")
main.add_lazy_command("models", "factscope.commands:models", "List and pull models.")
main.add_lazy_command("predict", "factscope.commands:predict", "Print the next-token distribution after a prompt.")
main.add_lazy_command("facts", "factscope.commands:facts", "Facts a model knows.")
main.add_lazy_command("data", "factscope.facts:data_cli", "Fact data sets: list, show, fetch CounterFact.")
main.add_lazy_command("demo", "factscope.commands:demo", "The main job: every analysis on the default model, one report.")
main.add_lazy_command("edit", "factscope.edit.cli:edit", "Knowledge editing (ROME, FT-M): efficacy, paraphrase, neighbourhood; lens and circuits before/after.")

# ============================================================================================


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
