"""`python -m benchmarks`: the suite from a source checkout (the same as `moa-stream bench`)."""

from __future__ import annotations

from .suite import main

raise SystemExit(main())
