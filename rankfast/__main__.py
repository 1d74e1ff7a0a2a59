"""``python -m rankfast``: the same as the ``rankfast`` console script."""

from rankfast.cli import main

raise SystemExit(main())
