"""`python -m ptdaemon`: the same as the `ptdaemon` command."""

from ptdaemon.cli import main

main()
