"""EvaluationService over gRPC. Its own RPCs arrive with the evaluation service issue (#5); the job surface works now."""

from services.core.runtime import planned_build
from services.gen.tunery.v1 import evaluation_pb2_grpc as grpc_api

build = planned_build(grpc_api.EvaluationServiceServicer, grpc_api.add_EvaluationServiceServicer_to_server,
                      "tunery.v1.EvaluationService", "evaluation", "the evaluation service issue (#5)")
