"""``g4seg serve``: a local web page that shows the method at work (the optional extra ``g4seg[web]``).

- :mod:`g4seg.web.workspace`: the server's own temporary folder, one folder per request, the upload limit.
- :mod:`g4seg.web.requests`: what a click on "Refine" does, without gradio (testable without a browser).
- :mod:`g4seg.web.panels`: the pictures the page shows.
- :mod:`g4seg.web.examples`: the bundled examples (the toy world's scenes).
- :mod:`g4seg.web.app`: the gradio page and its launch; the only module that imports gradio.
"""
