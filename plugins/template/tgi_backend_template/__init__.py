"""tgi-backend-template: copy this package to start a tgi backend plugin.

`plugin.py` holds the three hooks tgi calls; `backend.py` holds the backend itself.
"""

__all__: list[str] = []
