"""The registry jobs' typed specs (what the job reads back from the store)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DatasetFormatName = Literal["auto", "alpaca", "chat", "sharegpt", "completion", "preference"]
DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class ImportModelSpec(BaseModel):
    source: str = Field(description="absolute path to a Hugging Face model directory, or hf://org/name")
    name: str = Field(description="artifact name")
    revision: str = ""
    allow_trust_remote_code: bool = False


class ImportDatasetSpec(BaseModel):
    source: str = Field(description="absolute path to a JSONL, JSON, CSV or Parquet file")
    name: str
    format: DatasetFormatName = "auto"
