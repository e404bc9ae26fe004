"""`python -m gateway.simulator`: the same as `gateway simulate`."""

import sys

from gateway.simulator.cli import main

sys.exit(main())
