"""``python -m bench.world --table``: the evaluator's accuracy on clean and degraded renders."""

from bench.world.evaluate import main

raise SystemExit(main())
