"""``python -m divergent.cli``: the same as the ``divergent`` command."""

from divergent.cli import main

main()
