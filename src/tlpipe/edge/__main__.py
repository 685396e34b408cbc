import sys

from tlpipe.edge.cli import main

sys.exit(main())
