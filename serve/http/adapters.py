"""POST /v1/adapters and DELETE /v1/adapters/{name}: load and unload LoRA adapters while the server runs, on a
backend that serves several (backends/lora.py). Registered only there; both need the API key, and a server
started without one answers 403 (loading reads a path on the server's disk).

    curl -s 127.0.0.1:8000/v1/adapters -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \\
         -d '{"name": "support", "path": "exports/support/adapters/support.onnx_adapter"}'
    curl -s -X DELETE '127.0.0.1:8000/v1/adapters/support?drain=true' -H "Authorization: Bearer $KEY"

The engine makes each change between two decode steps (engine.py), so a running step never sees its banks
change. A bad file is a 400 naming the adapter, a name already served a 409; unloading an unknown name is a 404,
one with requests in flight a 409 naming the count, or with ?drain=true a 202: the name takes no new request and
its columns go when its last request ends. Other adapters keep serving throughout.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from lite_sft.errors import AdapterConflict, ServeError, UnknownAdapter

from .auth import ApiKey
from .schemas import AdapterLoad, ApiError
from .served import ServedModel


class AdapterHandler:
    def __init__(self, served: ServedModel, api_key: ApiKey):
        self.served, self.api_key = served, api_key

    def router(self, keyed: list) -> APIRouter:
        router = APIRouter()
        guard = keyed or [Depends(self.no_key)]
        router.add_api_route("/v1/adapters", self.load, methods=["POST"], dependencies=guard, status_code=201,
                             summary="Load a LoRA adapter file")
        router.add_api_route("/v1/adapters/{name}", self.unload, methods=["DELETE"], dependencies=guard,
                             summary="Unload a LoRA adapter (?drain=true: after its requests in flight)")
        return router

    @staticmethod
    def no_key() -> None:
        raise ApiError(403, "loading and unloading adapters needs an API key: start the server with "
                       "LITE_SFT_API_KEY set (or --api-key)", "permission_error", code="api_key_required")

    async def load(self, body: AdapterLoad):
        served = self.served
        try:
            # Read and checked on a thread of its own, then added by the engine between two steps: the decode
            # steps wait for the banks to be rebuilt, never for the disk.
            adapter = await asyncio.get_running_loop().run_in_executor(
                None, served.backend.read_adapter, body.name, body.path)
            about = await asyncio.wrap_future(served.engine.add_adapter(adapter))
        except AdapterConflict as err:
            raise ApiError(409, str(err), param="name", code="adapter_exists") from err
        except ServeError as err:
            raise ApiError(400, str(err), param="path", code="invalid_adapter") from err
        return {"id": body.name, "object": "model", "owned_by": "lite-sft", "adapter": about}

    async def unload(self, name: str, drain: bool = False):
        try:
            gone, users = await asyncio.wrap_future(self.served.engine.unload_adapter(name, drain))
        except UnknownAdapter as err:
            raise ApiError(404, str(err), param="name", code="model_not_found") from err
        except AdapterConflict as err:
            raise ApiError(409, str(err), param="name", code="adapter_in_use") from err
        if gone:
            return {"id": name, "object": "model", "deleted": True}
        return JSONResponse({"id": name, "object": "model", "deleted": False, "draining": users}, status_code=202)
