"""``python -m bpjax …``: the same as the ``bpjax`` command (see :mod:`bpjax.cli`)."""
from .cli.main import main

raise SystemExit(main())
