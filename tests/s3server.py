"""A local S3 endpoint (moto's server on the loopback address) for tests and benchmarks: no internet needed.

``local_s3()`` starts the server, points the standard AWS variables at it (dummy credentials,
``AWS_ENDPOINT_URL_S3``), creates a bucket and yields ``s3://BUCKET``; everything is restored afterwards.
The toolkit reads credentials and the endpoint only from that standard chain, as it would on real S3.
"""

from __future__ import annotations

import contextlib
import os
import uuid


@contextlib.contextmanager
def local_s3(bucket: str | None = None):
    import boto3
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = bucket or f"toolkit-{uuid.uuid4().hex[:8]}"
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
