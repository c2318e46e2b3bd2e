"""The ``quantkit`` command (typer): argument parsing, terminal output and error lines around the layers below."""
