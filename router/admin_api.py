"""The admin HTTP endpoints behind `splitserve scale` (and any script or autoscaler).

POST /admin/scale {"prefill": N, "decode": M} (or "colocated": K)
    -> 200 {"pools": {"prefill": N, "decode": M}} once new workers are active and removed
       ones have drained; 400 for a bad count (below a pool's minimum, negative, a pool the
       mode lacks) and nothing changes; 409 when the backend cannot scale; 503 when new
       workers found no room in the cluster before the start timeout
"""

from __future__ import annotations

import msgspec
from fastapi import FastAPI, Request, Response

from router.protocol import APIError, ErrorResponse, api_error


class ScaleRequest(msgspec.Struct, forbid_unknown_fields=True):
    prefill: int | None = None
    decode: int | None = None
    colocated: int | None = None


def add_admin_routes(app: FastAPI, backend: object) -> None:
    @app.post("/admin/scale")
    async def scale(request: Request) -> Response:
        try:
            req = msgspec.json.decode(await request.body(), type=ScaleRequest)
            scale_to = getattr(backend, "scale", None)
            if scale_to is None:
                raise APIError(409, "this server's backend has fixed pools; it cannot scale")
            pools = await scale_to(prefill=req.prefill, decode=req.decode, colocated=req.colocated)
        except Exception as exc:  # every failure becomes an OpenAI error body
            err = api_error(exc)
            body = msgspec.json.encode(ErrorResponse(err.body()))
            return Response(body, status_code=err.status, media_type="application/json")
        return Response(msgspec.json.encode({"pools": pools}), media_type="application/json")
