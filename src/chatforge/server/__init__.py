"""`chatforge serve`: an OpenAI-compatible HTTP API and a web chat page over one model.

    app.py                the FastAPI app (create_app), the guard in front of it, serve()
    openai_api.py         /v1/chat/completions, /v1/completions, /v1/models
    tokens_api.py         /tokenize, /detokenize, /v1/inspect
    conversations_api.py  the page's /api/conversations..., kept by store.py in SQLite
    scheduler.py          continuous batching on the model's own thread
    service.py            the loaded model, and scheduler events into asyncio
    metrics.py            /metrics in Prometheus text format
    process.py            `chatforge serve` as a child process (tests, benchmarks)
    web/                  the page: HTML, JS and CSS, no build step

Nothing is imported here, so the `chatforge` command stays quick to start.
"""
