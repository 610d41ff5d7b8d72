"""`python -m trajinv`: the trajinv command line (trajinv.cli)."""

from trajinv.cli import main

main()
