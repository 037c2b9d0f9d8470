import sys

from qmoi_sync.agent.cli import main

sys.exit(main())
