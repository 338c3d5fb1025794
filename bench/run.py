"""Benchmarks for the foundation, each printed as a ratio against the bare library doing the same work.

    make bench            (inside a loopback-only namespace, like the tests)

1. Ray head start: `ray start --head` until the job API answers.
2. Model import throughput (MB/s) through gRPC -> Ray job -> store, for the local store and S3 (moto), against a
   plain disk copy (shutil.copytree) of the same files; and the re-import, which uploads 0 bytes.
3. Unary RPC latency: GetArtifact (auth + error interceptors + a store read) against the bare gRPC health Check
   on the same server.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.tunery.v1 import common_pb2 as pb
from services.registry.service import RegistrySettings
from services.registry.servicer import build
from services.sdk.client import TuneryClient
from tests.modeldirs import make_model, write_safetensors
from tests.servers import S3_KEYS, RayHead, S3Server, ServerThread, wait_for
from services.cli.stack import health

TOKEN = "bench"


def make_big_model(root: Path, total_mb: int, shards: int) -> Path:
    make_model(root)
    (root / "model.safetensors").unlink()
    per = total_mb * 1024 * 1024 // 4 // shards
    import json
    import os

    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(root / name, {f"w{i}": ("F32", [1])})
        # fill with random bytes quickly: header for one float, then rewrite as a big tensor
        header = json.dumps({f"w{i}": {"dtype": "F32", "shape": [per], "data_offsets": [0, per * 4]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(root / name, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            f.write(os.urandom(per * 4))
        weight_map[f"w{i}"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="model size to import")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tunery-bench-"))
    s3 = S3Server()
    t0 = time.monotonic()
    head = RayHead({**S3_KEYS, "TUNERY_S3_ENDPOINT": s3.endpoint})
    print(f"ray head start: {head.start_s:.2f} s (ray start --head until the job API answers)")
    servers = ServerThread()
    try:
        model = make_big_model(tmp / "model", args.mb, args.shards)
        size_mb = sum(f.stat().st_size for f in model.iterdir()) / 1e6
        t = time.monotonic()
        shutil.copytree(model, tmp / "copy")
        copy_s = time.monotonic() - t
        print(f"\nmodel: {size_mb:.0f} MB in {args.shards} shards")
        print(f"plain disk copy (shutil.copytree): {copy_s:.2f} s = {size_mb / copy_s:.0f} MB/s")
        stores = {
            "local": dict(store_url=f"file://{tmp / 'store'}"),
            "s3 (moto)": dict(store_url="s3://bench", s3_endpoint=s3.endpoint, s3_access_key=S3_KEYS["TUNERY_S3_ACCESS_KEY"],
                              s3_secret_key=S3_KEYS["TUNERY_S3_SECRET_KEY"]),
        }
        client = None
        for label, store in stores.items():
            settings = RegistrySettings(project="bench", ray_address=head.address, auth_tokens=TOKEN, port=0,
                                        cache_dir=tmp / "cache", **store)
            port = servers.start(settings, build)
            wait_for(lambda: health(port) == "SERVING", 30)
            client = TuneryClient(f"127.0.0.1:{port}", TOKEN)
            for attempt in ("first import", "re-import"):
                t = time.monotonic()
                job = client.import_model(str(model), "big")
                final = client.wait(job.id, 900)
                wall = time.monotonic() - t
                assert final.state == pb.JOB_STATE_SUCCEEDED, final.state_reason
                m = final.latest_metrics
                print(f"{label:10s} {attempt:12s}: job wall {wall:6.2f} s ({size_mb / wall:5.0f} MB/s), "
                      f"in-job hash+upload {m['import_mb_per_s']:5.0f} MB/s, uploaded {m['bytes_uploaded'] / 1e6:.0f} MB; "
                      f"vs disk copy: {wall / copy_s:.1f}x the time")
        # unary RPC latency on the last server
        art = next(iter(client.list_artifacts()))
        md = client.metadata
        stub_health = health_pb2_grpc.HealthStub(client.channel)
        for _ in range(50):
            client.get_artifact(art.id)
            stub_health.Check(health_pb2.HealthCheckRequest())
        lat_get, lat_health = [], []
        for _ in range(args.calls):
            t = time.perf_counter()
            client.get_artifact(art.id)
            lat_get.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            stub_health.Check(health_pb2.HealthCheckRequest(), metadata=md)
            lat_health.append((time.perf_counter() - t) * 1e3)
        print(f"\nunary RPC over {args.calls} calls (ms): GetArtifact p50 {p(lat_get, .5):.2f} p99 {p(lat_get, .99):.2f}; "
              f"bare health Check p50 {p(lat_health, .5):.2f} p99 {p(lat_health, .99):.2f}; "
              f"ratio p50 {p(lat_get, .5) / p(lat_health, .5):.1f}x")
    finally:
        servers.close()
        head.stop()
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
