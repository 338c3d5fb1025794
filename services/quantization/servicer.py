"""QuantizationService over gRPC. Its own RPCs arrive with the quantization issue (not filed yet); the job surface works now."""

from services.core.planned import planned_build
from services.gen.tunery.v1 import quantization_pb2_grpc as grpc_api

build = planned_build(grpc_api.QuantizationServiceServicer, grpc_api.add_QuantizationServiceServicer_to_server,
                      "tunery.v1.QuantizationService", "quantization", "the quantization issue (not filed yet)")
