"""Evaluation service logic and settings. No grpc."""

from pydantic import Field

from services.core.settings import ServiceSettings


class EvaluationSettings(ServiceSettings):
    service: str = "evaluation"
    port: int = Field(50056, validation_alias="TUNERY_EVALUATION_PORT")
