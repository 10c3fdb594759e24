"""HTTP routes, one module per audience."""

#: ``openapi_extra`` of the routes that take a safetensors file as their body (read by ``deps.read_body``, so
#: FastAPI would not describe it).
SAFETENSORS_BODY = {"requestBody": {
    "required": True,
    "description": "a safetensors file: named tensors and string metadata (no pickle)",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}}
