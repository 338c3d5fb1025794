"""PipelineService over gRPC. Its own RPCs arrive with the pipeline issue (not filed yet); the job surface works now."""

from services.core.planned import planned_build
from services.gen.tunery.v1 import pipeline_pb2_grpc as grpc_api

build = planned_build(grpc_api.PipelineServiceServicer, grpc_api.add_PipelineServiceServicer_to_server,
                      "tunery.v1.PipelineService", "pipeline", "the pipeline issue (not filed yet)")
