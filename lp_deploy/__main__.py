"""``python -m lp_deploy`` runs the CLI."""

import sys

from lp_deploy.cli import main

sys.exit(main())
