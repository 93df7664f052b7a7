"""The serving ceiling: a bare ASGI handler (orjson + ONNX Runtime, no validation, no batching).

serve_bench.py runs it beside ``leanserve serve`` on the same model, body and uvicorn settings, so the
server's figure is a ratio against what any Python server on this machine could do in the same run.
It reads the body, parses the first input's ``data`` with orjson, runs ONNX Runtime inline on the
event loop and writes the first output back as V2 JSON. Nothing else: no checks, no metrics.

    python benchmarks/bare_server.py MODEL.onnx --port 8100 [--threads 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import orjson


def build_app(model_path: str, threads: int):
    """An ASGI app answering every POST with the model's outputs for the body's first input."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    headers = [(b"content-type", b"application/json")]

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] != "POST":  # readiness probes
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"ready":true}'})
            return
        tensor = orjson.loads(body)["inputs"][0]
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        result = session.run([output_name], {input_name: array})[0]
        answer = orjson.dumps({"model_name": "bare", "outputs": [
            {"name": output_name, "datatype": "FP32", "shape": list(result.shape), "data": result.ravel()}]},
            option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = parser.parse_args()
    # the same server settings leanserve runs with (serve/app.py)
    uvicorn.run(build_app(args.model, args.threads), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, http="httptools", loop="uvloop", server_header=False, proxy_headers=False)


if __name__ == "__main__":
    main()
