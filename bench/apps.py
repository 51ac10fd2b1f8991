"""The benchmark application: the demo app's job kinds plus ``stamp``.

Workers of ``bench/pickup`` run it (``TIERLINE_APP=bench.apps:app``); producers use it to
validate what they enqueue.
"""

from __future__ import annotations

import time

from tierline.app import App
from tierline.demo import app as demo

app = App("bench")
app.handlers.update(demo.handlers)


@app.job()
async def stamp() -> dict[str, float]:
    """Returns the wall-clock time at which the handler started."""
    return {"t": time.time()}
