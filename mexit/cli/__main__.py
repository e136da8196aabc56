"""``python -m mexit.cli …``: the ``mexit`` command without its console script (ServerProcess runs it)."""

from mexit.cli import main

main()
