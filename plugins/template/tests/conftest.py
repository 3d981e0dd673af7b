"""Make `tgi_backend_template` importable without installing it.

An installed plugin needs none of this; the template's tests run from a checkout of tgi
where the template is deliberately not installed (installing it would add a `template`
entry point to every `tgi backends` listing).
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPLATE_ROOT = str(Path(__file__).resolve().parents[1])
if TEMPLATE_ROOT not in sys.path:
    sys.path.insert(0, TEMPLATE_ROOT)
