"""``python -m dyndiag`` runs the ``dyndiag`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="dyndiag")
