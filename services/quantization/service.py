"""Quantization service logic and settings. No grpc."""


from services.core.settings import ServiceSettings, port_field


class QuantizationSettings(ServiceSettings):
    service: str = "quantization"
    port: int = port_field("quantization")
