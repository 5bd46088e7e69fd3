"""``python -m edgekiln``: the edgekiln command."""

from edgekiln.cli import main

raise SystemExit(main())
