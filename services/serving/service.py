"""Serving service logic and settings. No grpc."""


from services.core.settings import ServiceSettings, port_field


class ServingSettings(ServiceSettings):
    service: str = "serving"
    port: int = port_field("serving")
