"""Training service logic and settings. No grpc."""

from pydantic import Field

from services.core.settings import ServiceSettings


class TrainingSettings(ServiceSettings):
    service: str = "training"
    port: int = Field(50053, validation_alias="TUNERY_TRAINING_PORT")
