"""`python -m mailbus` is the `mailbus` command."""

from mailbus.cli import main

main()
