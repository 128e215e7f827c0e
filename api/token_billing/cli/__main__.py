"""`python -m token_billing.cli`: the `token-billing` command without its console script."""

import sys

from token_billing.cli import main

sys.exit(main())
