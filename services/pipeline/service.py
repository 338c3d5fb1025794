"""Pipeline service logic and settings. No grpc."""


from services.core.settings import ServiceSettings, port_field


class PipelineSettings(ServiceSettings):
    service: str = "pipeline"
    port: int = port_field("pipeline")
