"""Serving service logic and settings. No grpc."""

from pydantic import Field

from services.core.settings import ServiceSettings


class ServingSettings(ServiceSettings):
    service: str = "serving"
    port: int = Field(50057, validation_alias="TUNERY_SERVING_PORT")
