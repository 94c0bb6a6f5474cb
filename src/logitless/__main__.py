"""`python -m logitless bench`: the same as the `logitless` console script."""

from logitless.cli import main

raise SystemExit(main())
