"""``python -m sidecar.simulator``: the same as ``sidecar simulate``."""

from sidecar.simulator.main import main

raise SystemExit(main())
