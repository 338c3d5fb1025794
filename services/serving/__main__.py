"""python -m services.serving: serve the serving service until SIGTERM."""

from services.core.runtime import run_service
from services.serving.service import ServingSettings
from services.serving.servicer import build

if __name__ == "__main__":
    run_service(ServingSettings(), build)
