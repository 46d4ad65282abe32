"""``python -m aioaccel``: the ``aioaccel`` command."""

from .cli import main

if __name__ == "__main__":  # importing this module (tools that walk the package) runs nothing
    raise SystemExit(main())
