"""The registry jobs' typed specs (what the job reads back from the store)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DatasetFormatName = Literal["auto", "alpaca", "chat", "sharegpt", "completion", "preference"]


class ImportModelSpec(BaseModel):
    source: str = Field(description="upload://<listing sha256>, s3://bucket/prefix/, hf://org/name, or a model "
                        "folder on the service's host under its import roots")
    name: str = Field(description="artifact name")
    revision: str = ""
    allow_trust_remote_code: bool = False
    uploaded_from: str = Field("", max_length=4096, description="the client's path of an upload (recorded)")


class ImportDatasetSpec(BaseModel):
    source: str = Field(description="upload://<listing sha256>, s3://bucket/key, https://… or a file on the "
                        "service's host under its import roots (JSONL, JSON, CSV or Parquet)")
    name: str
    format: DatasetFormatName = "auto"
    uploaded_from: str = Field("", max_length=4096, description="the client's path of an upload (recorded)")
    url_max_bytes: int = Field(0, ge=0, description="the most an http(s) source may send (set by the service)")
