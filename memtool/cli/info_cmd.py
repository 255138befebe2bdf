"""`memtool info`: versions, devices, kernel backends, cache paths."""

from rich.console import Console
from rich.table import Table

from memtool.cli.common import DebugOption, JsonOption, run_command
from memtool.info import environment_info


def info_command(json_out: bool = JsonOption, debug: bool = DebugOption) -> None:
    """Show versions, devices, usable kernel backends and cache paths."""
    run_command(lambda: (environment_info(), []), json_out=json_out, debug=debug, render=_render)


def _render(info: dict) -> None:
    table = Table(title=f"memtool {info['memtool']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("python", f"{info['python']} ({info['platform']})")
    for name, version in info["packages"].items():
        table.add_row(name, version or "[dim]not installed[/]")
    for device in info["devices"]:
        table.add_row(f"device {device['type']}", device["name"])
    for name, backend in info["kernel_backends"].items():
        mark = "[green]usable[/]" if backend["usable"] else "[yellow]not usable[/]"
        table.add_row(f"kernels: {name}", f"{mark} ({backend['note']})")
    table.add_row("cache", f"{info['cache']['home']} ({info['cache']['home_from']})")
    for name, model in info["builtin_models"].items():
        table.add_row(f"model {name}", "cached" if model["cached"] else "not fetched yet")
    Console().print(table)
