"""``python -m crossformer ...`` (also what ``torchrun -m crossformer train`` runs)."""

import sys

from .cli import main

sys.exit(main())
