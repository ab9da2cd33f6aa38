"""`python -m bench ...` (also what `accelerate launch -m bench` and `torchrun -m bench` run)."""

import sys

from bench.cli import main

sys.exit(main())
