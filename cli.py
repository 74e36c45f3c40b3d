"""``python cli.py ...`` runs the fmaml command line (the same as the ``fmaml`` command)."""

from fmaml.training.cli import main

if __name__ == "__main__":
    main()
