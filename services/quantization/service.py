"""Quantization service logic and settings. No grpc."""

from pydantic import Field

from services.core.settings import ServiceSettings


class QuantizationSettings(ServiceSettings):
    service: str = "quantization"
    port: int = Field(50055, validation_alias="TUNERY_QUANTIZATION_PORT")
