"""The app the real Python servers run in `baton-bench servers`.

`app` is a WSGI callable (gunicorn), `asgi` an ASGI one (uvicorn). Both
answer every request with a short text naming the process and the baton
generation that serves it; neither knows about baton: the servers take the
listening socket baton hands over (gunicorn from LISTEN_FDS, uvicorn with
`--fd 3`) and drain on SIGTERM themselves.
"""

import os

BODY = f"hello from pid {os.getpid()}, generation {os.environ.get('BATON_GENERATION', '?')}\n"


def app(environ, start_response):
    body = BODY.encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
    )
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    body = BODY.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
