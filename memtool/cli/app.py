"""The `memtool` command: a thin dispatcher; each command lives in its own module."""

import typer

from memtool.cli.compress_cmd import compress_command
from memtool.cli.info_cmd import info_command
from memtool.cli.measure_cmd import measure_command
from memtool.cli.serve_cmd import serve_local_command
from memtool.cli.train_cmd import train_command

app = typer.Typer(
    name="memtool",
    help="Make large language models fit where memory is short.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("compress")(compress_command)
app.command("measure")(measure_command)
app.command("train")(train_command)
app.command("serve-local")(serve_local_command)
app.command("info")(info_command)


def main() -> None:
    app()
