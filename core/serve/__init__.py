"""`adaspec serve`: the reference engine, its drafters and the ATLAS controller behind the OpenAI API.

`protocol` (request schemas, responses, errors), `text` (incremental detokenization with stop strings),
`loop` (the engine thread: one continuous batch that requests join and leave between steps), `app` (the
FastAPI routes), `settings` (`ADASPEC_SERVE_*`). The command itself, which also starts or joins the sidecar,
is in `adaspec.core.cli` (a composition root).
"""
