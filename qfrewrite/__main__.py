"""``python -m qfrewrite``: the command line of :mod:`qfrewrite.cli`."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="qfrewrite")
