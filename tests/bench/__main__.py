"""``python -m tests.bench [--quick]``: run every benchmark, rewrite docs/performance.md."""

from __future__ import annotations

from tests.bench.run import main

raise SystemExit(main())
