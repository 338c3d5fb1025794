"""Pipeline service logic and settings. No grpc."""

from pydantic import Field

from services.core.settings import ServiceSettings


class PipelineSettings(ServiceSettings):
    service: str = "pipeline"
    port: int = Field(50058, validation_alias="TUNERY_PIPELINE_PORT")
