"""Datagen service logic and settings. No grpc."""

from pydantic import Field

from services.core.settings import ServiceSettings


class DatagenSettings(ServiceSettings):
    service: str = "datagen"
    port: int = Field(50052, validation_alias="TUNERY_DATAGEN_PORT")
