"""`python -m parscale VERB ...` (this is what `torchrun -m parscale train ...` runs)."""
import sys

from parscale.cli.main import main

sys.exit(main())
