"""`python -m tgi_backend_cuda.gpu_check`: see the package's docstring."""

import sys

from tgi_backend_cuda.gpu_check._cli import main

sys.exit(main())
