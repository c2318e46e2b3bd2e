"""``python -m quantkit.cli``: the same entry point as the ``quantkit`` console script."""

from quantkit.cli.main import run

run()
