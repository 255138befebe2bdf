"""Pictures of perplexity against bytes (matplotlib, an optional extra: `memtool[plot]`)."""

import itertools
from pathlib import Path

from memtool.atomic import atomic_file
from memtool.errors import MemtoolError


def plot_perplexity_vs_bytes(
    series: dict[str, list[tuple[int, float]]],
    path: str | Path,
    title: str,
    frontier: list[tuple[int, float]] | None = None,
) -> Path:
    """Draw each series of (weight bytes, perplexity) points as a line and write a PNG;
    `frontier` (the Pareto-optimal points) is drawn as a dashed staircase over them.

    Raises:
        MemtoolError: matplotlib is missing, or the path is not a .png file.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MemtoolError(f"--plot {path}: give a .png file name")
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on CI machines
        from matplotlib import pyplot
    except ImportError:
        raise MemtoolError(
            "--plot needs matplotlib: pip install 'memtool[plot]' (or pip install matplotlib)"
        ) from None
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    # Colours repeat after ten series; curves and single points also differ in marker shape,
    # so no two series of a crowded picture look alike.
    shapes = itertools.cycle("o^sDvP*Xph")
    for index, (label, points) in enumerate(series.items()):
        points = sorted(points)
        shape = next(shapes)
        if len(points) == 1:
            style = {"marker": shape, "linestyle": "none", "markersize": 7}
        else:
            style = {"marker": shape if index >= 10 else ".", "markersize": 4}
        axes.plot([b / 1e6 for b, _ in points], [p for _, p in points], label=label, **style)
    if frontier:
        points = sorted(frontier)
        axes.step(
            [b / 1e6 for b, _ in points],
            [p for _, p in points],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto frontier",
        )
    axes.set_xlabel("weight bytes (MB)")
    axes.set_ylabel("perplexity")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    pyplot.close(figure)
    return path
