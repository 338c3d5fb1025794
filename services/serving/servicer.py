"""ServingService over gRPC. Its own RPCs arrive with the serving issue (not filed yet); the job surface works now."""

from services.core.planned import planned_build
from services.gen.tunery.v1 import serving_pb2_grpc as grpc_api

build = planned_build(grpc_api.ServingServiceServicer, grpc_api.add_ServingServiceServicer_to_server,
                      "tunery.v1.ServingService", "serving", "the serving issue (not filed yet)")
