import sys

from fastmtt.apps.cli import main

sys.exit(main())
