"""An ASGI app that does nothing: the floor of the latency scenario in benches/load.py.

Served by Granian on the server's core like pwachat, it answers every request with `ok`, so its
latency at 100 req/s is what the machine itself charges for one request to that core and back.
"""


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
