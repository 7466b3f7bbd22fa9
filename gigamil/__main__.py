"""``python -m gigamil`` runs the CLI."""

from gigamil.cli.main import main

if __name__ == "__main__":
    main()
