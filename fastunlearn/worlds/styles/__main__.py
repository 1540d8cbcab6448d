import sys

from .world import main

sys.exit(main())
