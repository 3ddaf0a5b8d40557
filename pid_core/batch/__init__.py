"""``python -m pid_core batch``: decode a manifest of latents on Ray, resumably.

* :mod:`.picture`   one picture's decode, shared with ``python -m pid_core decode`` (so the outputs are the same)
* :mod:`.manifest`  the JSON Lines manifest: parsing and validation, one sentence per bad line
* :mod:`.outputs`   atomic output files, the results log, the run lock
* :mod:`.worker`    one decoder per worker slot, loaded once, one result record per picture
* :mod:`.driver`    the Ray driver: workers, retries after a worker died, resume, progress

Ray is optional and imported only by :mod:`.driver`; nothing else here needs it.
"""
