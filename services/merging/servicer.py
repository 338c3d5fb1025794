"""MergingService over gRPC. Its own RPCs arrive with the merge issue (not filed yet); the job surface works now."""

from services.core.planned import planned_build
from services.gen.tunery.v1 import merging_pb2_grpc as grpc_api

build = planned_build(grpc_api.MergingServiceServicer, grpc_api.add_MergingServiceServicer_to_server,
                      "tunery.v1.MergingService", "merging", "the merge issue (not filed yet)")
