"""CLI command groups: each module but ``options`` defines ``register(app: typer.Typer) -> None``."""
