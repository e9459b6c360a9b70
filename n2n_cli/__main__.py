"""``python -m n2n_cli`` runs the ``n2n`` command line."""

from .cli import main

main()
