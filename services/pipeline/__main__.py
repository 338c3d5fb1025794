"""python -m services.pipeline: serve the pipeline service until SIGTERM."""

from services.core.runtime import run_service
from services.pipeline.service import PipelineSettings
from services.pipeline.servicer import build

if __name__ == "__main__":
    run_service(PipelineSettings(), build)
