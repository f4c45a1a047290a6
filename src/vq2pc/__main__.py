import sys

from vq2pc.cli import main

sys.exit(main())
