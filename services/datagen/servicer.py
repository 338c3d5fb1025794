"""DatagenService over gRPC. Its own RPCs arrive with the data service issue (#3); the job surface works now."""

from services.core.runtime import planned_build
from services.gen.tunery.v1 import datagen_pb2_grpc as grpc_api

build = planned_build(grpc_api.DatagenServiceServicer, grpc_api.add_DatagenServiceServicer_to_server,
                      "tunery.v1.DatagenService", "datagen", "the data service issue (#3)")
