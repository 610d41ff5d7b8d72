"""The trajinv command, runnable from a source checkout: ``python cli.py --help``.

It runs exactly what the installed `trajinv` console script runs; the commands
live in `trajinv/cli.py`, inside the package, so that every install mode
(wheel, editable, strict editable) ships them under one name.
"""

from trajinv.cli import main

if __name__ == "__main__":
    main()
