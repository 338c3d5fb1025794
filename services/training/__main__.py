"""python -m services.training: serve the training service until SIGTERM."""

from services.core.runtime import run_service
from services.training.service import TrainingSettings
from services.training.servicer import build

if __name__ == "__main__":
    run_service(TrainingSettings(), build)
