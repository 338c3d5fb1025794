"""Merging service logic and settings. No grpc."""


from services.core.settings import ServiceSettings, port_field


class MergingSettings(ServiceSettings):
    service: str = "merging"
    port: int = port_field("merging")
