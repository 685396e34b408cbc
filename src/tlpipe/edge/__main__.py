import sys

from tlpipe.edge.commands import main

sys.exit(main())
