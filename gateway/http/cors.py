"""CORS for browser clients of ``/api/v2/`` (``server.cors_origins``).

The middleware sits outside the error middleware, so error envelopes (a 402 included) carry
the CORS headers too and a page's script can read them, as the seed's jQuery example does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ALLOWED_REQUEST_METHODS = {"GET", "POST"}

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = {"cache-control", "content-type", "x-requested-with", "accept", "x-request-id"}
EXPOSED_HEADERS = (
    "Cache-Status, X-Content-Hash, Retry-After, RateLimit, RateLimit-Policy, Warning, X-Request-Id"
)
MAX_AGE_S = "600"


def cors_middleware(origins: tuple[str, ...]) -> Middleware:
    allow_any = "*" in origins
    allowed = frozenset(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/v2"):
            return await handler(request)
        origin = request.headers.get("Origin")
        permitted = origin is not None and (allow_any or origin in allowed)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            method = request.headers["Access-Control-Request-Method"].upper()
            if not permitted or method not in ALLOWED_REQUEST_METHODS:
                return web.Response(status=403, headers={"Vary": "Origin"})
            asked = request.headers.get("Access-Control-Request-Headers", "")
            headers = [h.strip() for h in asked.split(",") if h.strip()]
            if any(h.lower() not in ALLOWED_HEADERS for h in headers):
                return web.Response(status=403, headers={"Vary": "Origin"})
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin or "",
                    "Access-Control-Allow-Methods": ALLOWED_METHODS,
                    "Access-Control-Allow-Headers": ", ".join(headers) or "Content-Type",
                    "Access-Control-Max-Age": MAX_AGE_S,
                    "Vary": "Origin",
                },
            )
        response = await handler(request)
        # Every answer varies by Origin: a shared cache must not hand one origin's to another.
        response.headers.add("Vary", "Origin")
        if permitted:
            response.headers["Access-Control-Allow-Origin"] = origin or ""
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        return response

    return cors
