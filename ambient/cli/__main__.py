"""`python -m ambient.cli` runs ambientctl."""

from ambient.cli.main import main

main()
