"""`recpipe serve`: intention-guided recommendations over HTTP (FastAPI on uvicorn), with a small web page.

`app.create_app(ServeSettings(cfg))` is the ASGI app; `app.run(settings)` serves it; `engine.Engine` answers
batches of requests from one loaded run; `batcher.MicroBatcher` groups concurrent requests into batches.
"""
