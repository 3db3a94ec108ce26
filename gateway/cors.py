"""CORS for browser clients of ``/api/v2/`` (``server.cors_origins``).

The middleware sits outside the error middleware, so error envelopes (a 402 included) carry
the CORS headers too and a page's script can read them, as the seed's jQuery example does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = {"cache-control", "content-type", "x-requested-with", "accept"}
EXPOSED_HEADERS = ("Cache-Status, X-Content-Hash, Retry-After, RateLimit, RateLimit-Policy, "
                   "Warning")
MAX_AGE_S = "600"


def cors_middleware(origins: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    allow_any = "*" in origins
    allowed = frozenset(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/v2"):
            return await handler(request)
        origin = request.headers.get("Origin")
        permitted = origin is not None and (allow_any or origin in allowed)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not permitted:
                return web.Response(status=403, headers={"Vary": "Origin"})
            asked = request.headers.get("Access-Control-Request-Headers", "")
            headers = [h.strip() for h in asked.split(",") if h.strip()]
            if any(h.lower() not in ALLOWED_HEADERS for h in headers):
                return web.Response(status=403, headers={"Vary": "Origin"})
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin or "",
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ", ".join(headers) or "Content-Type",
                "Access-Control-Max-Age": MAX_AGE_S,
                "Vary": "Origin",
            })
        response = await handler(request)
        if permitted:
            response.headers["Access-Control-Allow-Origin"] = origin or ""
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            response.headers.add("Vary", "Origin")
        return response

    return cors
