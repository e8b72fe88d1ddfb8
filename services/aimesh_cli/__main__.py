import sys

from aimesh_cli.main import main

sys.exit(main())
