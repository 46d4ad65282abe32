"""``python -m aioaccel``: the ``aioaccel`` command."""

from .cli import main

raise SystemExit(main())
