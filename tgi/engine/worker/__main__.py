"""`python -m tgi.engine.worker ADDRESS`: what `WorkerEngine` starts."""

import sys

from tgi.engine.worker.serve import main

sys.exit(main(sys.argv[1:]))
