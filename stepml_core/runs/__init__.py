"""Run folders: what one run left on disk, read safely.

* ``folders`` — run ids, metadata files (:class:`RunMetadata`), discovery in a data root, bounded file reads.
* ``limits`` — what one run folder may cost to read (bytes, lines, records, YAML nodes).
* ``ingest`` — one run folder in: metadata, fingerprints and trace tables out.
* ``request_log`` — the request log (every request sent, with the latency its client saw) and its ground truth.
* ``rules`` — one definition each of a failed request and a saturated run (the client limit).
* ``real_data`` — assembles the 16 real runs from ../shared into run folders (``stepml real-data``).
"""
