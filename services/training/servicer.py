"""TrainingService over gRPC. Its own RPCs arrive with the training service issue (#4); the job surface works now."""

from services.core.runtime import planned_build
from services.gen.tunery.v1 import training_pb2_grpc as grpc_api

build = planned_build(grpc_api.TrainingServiceServicer, grpc_api.add_TrainingServiceServicer_to_server,
                      "tunery.v1.TrainingService", "training", "the training service issue (#4)")
