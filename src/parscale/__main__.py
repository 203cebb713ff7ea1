"""`python -m parscale VERB ...` (this is what `torchrun -m parscale train ...` runs)."""
import sys

from parscale.cli import main

sys.exit(main())
