"""``python -m streamlet`` runs the command line."""

from streamlet.cli import main

main()
