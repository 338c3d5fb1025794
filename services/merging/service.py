"""Merging service logic and settings. No grpc."""

from pydantic import Field

from services.core.settings import ServiceSettings


class MergingSettings(ServiceSettings):
    service: str = "merging"
    port: int = Field(50054, validation_alias="TUNERY_MERGING_PORT")
