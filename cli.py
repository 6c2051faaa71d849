"""Entry point at the repo root: ``python cli.py run scenario=legal_then_medical strategy=naive``."""

from continual_ft.cli import main

if __name__ == "__main__":
    main()
